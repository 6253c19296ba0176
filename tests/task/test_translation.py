"""IWSLT'14 de-en task: dictionaries, token batching, the fairseq Transformer, beam search, the loss, and an
end-to-end run through the real engine on a synthetic corpus."""
import json
import math
import random
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.errors import UserError
from bench.registry import get_task
from bench.recipes import make_config
from bench.train.runner import execute
from tasks.translation.beam import beam_search, greedy_decode, remove_bpe, tokenized_bleu, translate
from tasks.translation.data import EOS, PAD, Dictionary, PairDataset, TokenBatchLoader, pad_right
from tasks.translation.model import count_parameters, create_transformer

from corpus import random_sources, write_synthetic_corpus
from tasks.iwslt14 import SRC, SYNTHETIC_MARKER, TGT, LabelSmoothedCrossEntropy, label_smoothed_nll_loss, load_corpus

# A prepared-format corpus written directly (no Moses, no BPE learning): a word-for-word lexicon the tiny
# Transformer learns in seconds. `bench data fake iwslt14` (raw archive + preparation) is tested elsewhere.


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: a second OpenMP thread gains nothing and, on a busy 2-core machine, costs ~10x."""


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("iwslt_syn"), n_train=400, n_valid=50, n_test=50)


@pytest.fixture(scope="module")
def trained_tiny(corpus_dir):
    """The tiny Transformer after 6 quick epochs of Adam on the synthetic corpus (float64, eval mode): it has
    learned enough to end sentences with </s> and to make beam search differ from greedy decoding."""
    c = load_corpus(corpus_dir)
    torch.manual_seed(0)
    model = create_transformer("transformer_tiny", len(c.src_dict), len(c.tgt_dict))
    loader = TokenBatchLoader(c.train, 256, seed=0, rank=0, world=1)
    opt = torch.optim.Adam(model.parameters(), 3e-3, betas=(0.9, 0.98))
    loss_fn = LabelSmoothedCrossEntropy(0.1)
    for epoch in range(6):
        loader.epoch = epoch
        for x, y in loader:
            loss_fn(model(*x), y).backward()
            opt.step()
            opt.zero_grad()
    return model.double().eval(), c


# ----------------------------------------------------------------------------------------------- data

def test_dictionary_specials_order_padding_and_encoding():
    d = Dictionary.build(["b a c", "a b", "c a", "zz y", "x"])
    assert d.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (d.bos_index, d.pad_index, d.eos_index, d.unk_index) == (0, 1, 2, 3)
    # a: 3, b: 2, c: 2, x / y / zz: 1 -> by count, ties by symbol
    assert d.symbols[4:10] == ["a", "b", "c", "x", "y", "zz"]
    assert len(d) == 16 and d.symbols[10:] == [f"madeupword{i:04d}" for i in range(6)]  # fairseq's padding to 8
    assert d.encode_line("c a q").tolist() == [6, 4, 3, 2]  # unknown -> <unk>, </s> appended
    assert d.string([6, 4, 3, 2, 1]) == "c a <unk>"
    assert len(Dictionary.build(["a b"], padding_factor=1)) == 6


def test_token_batches_cover_every_pair_once_within_max_tokens():
    g = torch.Generator().manual_seed(1)
    src = [torch.cat([torch.randint(4, 20, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g),
                      torch.tensor([EOS])]) for _ in range(300)]
    tgt = [torch.cat([torch.randint(4, 20, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g),
                      torch.tensor([EOS])]) for _ in range(300)]
    data = PairDataset(src, tgt)
    loader = TokenBatchLoader(data, max_tokens=128, seed=3, rank=0, world=1)
    assert len(loader.dataset) == 300
    for b in loader.batches:
        width = max(max(data.src_sizes[b]), max(data.tgt_sizes[b]))
        assert len(b) * width <= 128
    orders = []
    for epoch in range(3):
        loader.epoch = epoch
        seen = []
        n_batches = 0
        for (src_tokens, src_lengths, prev), target in loader:
            n_batches += 1
            assert src_tokens.shape[0] * max(src_tokens.shape[1], target.shape[1]) <= 128
            assert (src_lengths == src_tokens.ne(PAD).sum(1)).all()
            assert (prev[:, 0] == EOS).all()
            nonpad = target.ne(PAD)
            assert (prev.ne(PAD) == nonpad).all()
            inner = nonpad[:, 1:]
            assert (prev[:, 1:][inner] == target[:, :-1][inner]).all()  # the target shifted right
            assert (target.gather(1, nonpad.sum(1, keepdim=True) - 1) == EOS).all()
            seen += [tuple(t[t.ne(PAD)].tolist()) for t in target]
        assert n_batches == len(loader)
        assert Counter(seen) == Counter(tuple(t.tolist()) for t in tgt)  # every pair exactly once
        orders.append(loader.order(epoch))
    assert orders[0] != orders[1]
    assert TokenBatchLoader(data, 128, seed=3, rank=0, world=1).order(1) == orders[1]  # (seed, epoch) -> order
    assert TokenBatchLoader(data, 128, seed=4, rank=0, world=1).order(1) != orders[1]
    # data parallel: same number of batches on every rank, together covering all
    shards = [TokenBatchLoader(data, 128, seed=3, rank=r, world=3).order(2) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    assert set().union(*map(set, shards)) == set(range(len(loader.batches)))


def test_synthetic_corpus_loads_with_fairseq_dictionaries(corpus_dir):
    c = load_corpus(corpus_dir)
    assert (len(c.train), len(c.valid), len(c.test)) == (400, 50, 50) and c.synthetic
    assert len(c.src_dict) % 8 == 0 and len(c.tgt_dict) % 8 == 0
    assert c.train.src[0][-1] == EOS and c.tgt_dict.string(c.train.tgt[0]) == c.train.tgt_lines[0]
    assert remove_bpe("wo@@ rd5 word1 .") == "word5 word1 ."


def test_missing_corpus_is_a_one_line_user_error(tmp_path):
    cfg = make_config("iwslt14-de-en", minimizer="adam", data_dir=str(tmp_path), device="cpu")
    with pytest.raises(UserError) as e:
        get_task("iwslt14").build(cfg, torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and "train.de" in msg and "bench data prepare iwslt14 --raw DIR --out DIR" in msg


def test_recipe_defaults():
    cfg = make_config("iwslt14-de-en", minimizer="asam")
    assert (cfg.task, cfg.model, cfg.schedule) == ("iwslt14-de-en", "transformer", "inverse_sqrt")
    assert cfg.optimizer in ("adam", "adamw")  # Adam's betas from momentum / beta2
    assert (cfg.lr, cfg.momentum, cfg.beta2, cfg.warmup_steps, cfg.batch_size) == (5e-4, 0.9, 0.98, 4000, 4096)
    assert (cfg.weight_decay, cfg.label_smoothing, cfg.clip_norm, cfg.rho, cfg.eta) == (1e-4, 0.1, 0.0, 0.2, 0.01)
    assert make_config("iwslt14-de-en", minimizer="sam").rho == 0.05
    assert make_config("iwslt14-de-en", minimizer="adam", model="transformer_tiny").rho == 0.0
    assert get_task("iwslt14").minimizers()[0] == "adam"


# ----------------------------------------------------------------------------------------------- model

def test_parameter_count_equals_fairseq_transformer_iwslt_de_en():
    # fairseq-preprocess on prepare-iwslt14.sh's output: "[de] dictionary: 8848 types", "[en] ... 6632 types";
    # fairseq's own TransformerModel (--arch transformer_iwslt_de_en --share-decoder-input-output-embed)
    # built on dictionaries of these sizes has 39,469,056 parameters.
    model = create_transformer("transformer", 8848, 6632)
    d, f = 512, 1024
    attn, ffn, ln = 4 * (d * d + d), d * f + f + f * d + d, 2 * d
    by_hand = 8848 * d + 6632 * d + 6 * (attn + ffn + 2 * ln) + 6 * (2 * attn + ffn + 3 * ln)
    assert count_parameters(model) == by_hand == 39_469_056
    names = [n for n, _ in model.named_parameters()]
    assert all(n.endswith((".weight", ".bias")) for n in names)
    assert "decoder.embed_tokens.weight" in names and not any("output_projection" in n for n in names)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_incremental_decoding_equals_the_parallel_decoder(dtype, tol):
    torch.manual_seed(0)
    model = create_transformer("transformer_tiny", 40, 30).to(dtype).eval()
    src = pad_right(random_sources(4, 40, seed=1))
    prev = torch.randint(4, 30, (4, 7))
    prev[:, 0] = EOS
    with torch.no_grad():
        full = model(src, src.ne(PAD).sum(1), prev)
        state = model.start_decoding(src)
        steps = [model.decode_step(prev[:, t], state) for t in range(prev.shape[1])]
        # a reordered state (beam search) decodes the reordered rows
        state2 = model.start_decoding(src)
        model.decode_step(prev[:, 0], state2)
        order = torch.tensor([2, 2, 0])
        state2.reorder(order)
        nxt = model.decode_step(prev[order, 1], state2)
    assert (torch.stack(steps, 1) - full).abs().max() < tol
    assert (nxt - full[order, 1]).abs().max() < tol


# ----------------------------------------------------------------------------------------------- decoding

def test_beam_one_is_greedy_beam_five_beats_greedy_and_batching_changes_nothing(trained_tiny):
    model, c = trained_tiny
    sources = c.valid.src
    src = pad_right(sources)
    kw = dict(max_len_a=1.2, max_len_b=10)
    greedy = greedy_decode(model, src, **kw)
    beam1 = beam_search(model, src, beam=1, **kw)
    beam5 = beam_search(model, src, beam=5, **kw)
    assert [h["tokens"] for h in beam1] == [h["tokens"] for h in greedy]
    assert [h["score"] for h in beam1] == pytest.approx([h["score"] for h in greedy], abs=1e-5)
    # Beam search keeps the best 5 prefixes, so it usually finds a better-scoring translation than greedy
    # decoding; not always: greedy's own prefix can fall out of the beam (fairseq's beam search, which ours
    # reproduces, behaves the same).
    gain = [b["score"] - g["score"] for b, g in zip(beam5, greedy)]
    assert sum(x >= -1e-6 for x in gain) >= 0.9 * len(gain) and sum(gain) > 0
    assert sum(x > 1e-6 for x in gain) >= 5 and any(b["tokens"] != g["tokens"] for b, g in zip(beam5, greedy))
    for h, s in zip(beam5, sources):
        assert 1 <= len(h["tokens"]) <= int(1.2 * len(s) + 10) and EOS not in h["tokens"] and PAD not in h["tokens"]
    assert sum(len(h["tokens"]) < int(1.2 * len(s) + 10) for h, s in zip(beam5, sources)) >= 40  # </s> ends them
    alone = [beam_search(model, s.unsqueeze(0), beam=5, **kw)[0] for s in sources[:12]]
    assert [h["tokens"] for h in alone] == [h["tokens"] for h in beam5[:12]]
    assert [h["score"] for h in alone] == pytest.approx([h["score"] for h in beam5[:12]], abs=1e-5)
    # translate(): length-sorted batches of any size, results back in input order
    assert translate(model, sources, beam=5, max_tokens=40, **kw) == [h["tokens"] for h in beam5]


def test_length_penalty_normalises_by_length(trained_tiny):
    model, c = trained_tiny
    src = pad_right(c.valid.src[:10])
    raw = greedy_decode(model, src, lenpen=0.0)  # greedy tokens do not depend on lenpen
    assert len({len(r["tokens"]) for r in raw}) > 1
    for lenpen in (0.5, 1.0):
        for r, h in zip(raw, greedy_decode(model, src, lenpen=lenpen)):
            assert h["tokens"] == r["tokens"]
            assert h["score"] == pytest.approx(r["score"] / (len(r["tokens"]) + 1) ** lenpen, abs=1e-12)


def test_bleu_is_100_for_identical_text_and_low_for_noise():
    refs = ["the cat sat on the mat .", "a dog ran into the garden ."]
    assert tokenized_bleu(refs, refs) == pytest.approx(100.0)
    assert tokenized_bleu(["x y z w", "q r s t"], refs) < 1.0


# ----------------------------------------------------------------------------------------------- loss

def test_label_smoothed_loss_matches_a_hand_computation():
    eps, V = 0.1, 4
    logits = torch.tensor([[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]]])
    target = torch.tensor([[2, 0, PAD]])  # the last position is padding
    lp = torch.log_softmax(logits, -1)[0]
    by_hand = 0.0
    for t, k in ((0, 2), (1, 0)):  # target gets 1 - eps, every other class eps / (V - 1)
        q = [1 - eps if v == k else eps / (V - 1) for v in range(V)]
        by_hand += -sum(q[v] * lp[t, v].item() for v in range(V))
    loss = LabelSmoothedCrossEntropy(eps)(logits, target)
    assert loss.item() == pytest.approx(by_hand / 2, rel=1e-6)  # mean over the 2 non-pad tokens
    legacy, _ = label_smoothed_nll_loss(lp, target[0], eps, PAD, legacy=True)  # older fairseq: eps / V
    by_hand_legacy = sum(-(1 - eps) * lp[t, k].item() - eps / V * lp[t].sum().item() for t, k in ((0, 2), (1, 0)))
    assert legacy.item() == pytest.approx(by_hand_legacy, rel=1e-6)
    assert LabelSmoothedCrossEntropy(0.0)(logits, target).item() == pytest.approx(
        -(lp[0, 2] + lp[1, 0]).item() / 2, rel=1e-6)


# ----------------------------------------------------------------------------------------------- end to end

def test_tiny_transformer_learns_a_lexicon_through_the_engine_with_asam(corpus_dir, tmp_path):
    task = get_task("iwslt14-de-en")
    cfg = make_config("iwslt14-de-en", model="transformer_tiny", minimizer="asam", epochs=20, batch_size=256,
                      lr=3e-3, warmup_steps=50, data_dir=str(corpus_dir), results_dir=str(tmp_path), device="cpu")
    torch.manual_seed(cfg.seed)
    untrained = task.build(cfg, torch.device("cpu"))
    before = untrained.evaluate(untrained.model)
    row = execute(cfg)
    assert row["status"] == "ok" and row["synthetic"] is True
    assert row["optimizer"] in ("adam", "adamw") and (row["rho"], row["eta"]) == (0.2, 0.01)
    assert (row["train_size"], row["valid_size"], row["test_size"]) == (400, 50, 50)
    assert row["max_valid_bleu"] >= before["valid_bleu"] + 10, (before, row["max_valid_bleu"])
    assert row["test_bleu"] >= before["valid_bleu"] + 10 and 1 <= row["best_epoch"] <= 20
    assert {"final_valid_bleu", "test_sacrebleu"} <= set(row)
    epochs = pd.read_csv(tmp_path / "runs" / cfg.run_id / "epochs.csv")
    assert {"valid_loss", "valid_bleu", "valid_sacrebleu"} <= set(epochs.columns)
    assert epochs["valid_loss"].iloc[-1] < epochs["valid_loss"].iloc[0]


def test_fake_archive_prepared_then_trained_end_to_end(tmp_path):
    pytest.importorskip("tasks.translation.prepare")
    pytest.importorskip("subword_nmt")
    task = get_task("iwslt14")
    msg = task.make_fake(str(tmp_path / "iwslt"), train=120, test=8, seed=0)
    assert "\n" not in msg and str(tmp_path / "iwslt") in msg
    c = load_corpus(tmp_path / "iwslt")
    assert c.synthetic and len(c.train) > 0 and len(c.test) == 5 * 8  # five dev/test sets of 8 segments
    beam = task.eval_beam, task.test_beam
    task.eval_beam = task.test_beam = 2
    try:
        cfg = make_config("iwslt14-de-en", model="transformer_tiny", minimizer="sam", epochs=1, batch_size=512,
                          data_dir=str(tmp_path / "iwslt"), results_dir=str(tmp_path / "res"), device="cpu")
        row = execute(cfg)
    finally:
        task.eval_beam, task.test_beam = beam
    assert row["status"] == "ok" and row["synthetic"] is True and math.isfinite(row["test_bleu"])
    assert row["src_vocab"] == len(c.src_dict) and row["train_size"] == len(c.train)


def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(corpus_dir, tmp_path):
    # The best-validation weights and the epoch counter live in the task between epochs: they must come
    # back from the checkpoint, or best_epoch / test_bleu after a resume describe the wrong epoch.
    from bench.train.control import Interrupted, StopFlag
    from bench.train.runtime import seed_everything
    from bench.train.loop import train
    task = get_task("iwslt14-de-en")
    cfg = make_config("iwslt14-de-en", model="transformer_tiny", minimizer="sam", epochs=4, batch_size=256,
                      lr=3e-3, warmup_steps=50, data_dir=str(corpus_dir), device="cpu")
    cpu = torch.device("cpu")

    def fresh_process_job():
        seed_everything(cfg.seed)
        return task.build(cfg, cpu)

    job = fresh_process_job()
    straight = train(cfg, job, cpu, checkpoint=tmp_path / "straight.pt")
    straight_weights = job.model.state_dict()
    stop = StopFlag()
    stop.set = True
    for stop_after in (1, 2):
        with pytest.raises(Interrupted, match=f"after epoch {stop_after} of 4"):
            train(cfg, fresh_process_job(), cpu, checkpoint=tmp_path / "resumed.pt", stop=stop)
    job = fresh_process_job()
    resumed = train(cfg, job, cpu, checkpoint=tmp_path / "resumed.pt")
    assert straight["best_epoch"] > 2, straight  # the test's power: the best epoch comes after the resumes
    assert resumed["resumptions"] == 2 and resumed["resumed_from"] == 2
    for key in ("best_epoch", "test_bleu", "test_sacrebleu", "max_valid_bleu", "final_valid_bleu"):
        assert resumed[key] == straight[key], key
    assert [h["valid_bleu"] for h in resumed["epochs"]] == [h["valid_bleu"] for h in straight["epochs"]]
    assert all(torch.equal(straight_weights[k], v) for k, v in job.model.state_dict().items())


def test_batches_are_pinned_for_a_gpu_and_not_for_the_cpu(corpus_dir, monkeypatch):
    """On CUDA the collated batches sit in page-locked memory, so the engine's non_blocking copy overlaps the GPU's
    work instead of waiting for it (pageable memory); on the CPU nothing is pinned (no GPU: pinning would fail)."""
    pinned = set()
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.add(id(self)) or self)
    cfg = make_config("iwslt14-de-en", model="transformer_tiny", minimizer="adam", data_dir=str(corpus_dir),
                      device="cpu")
    task = get_task("iwslt14-de-en")
    on_cpu = task.build(cfg, torch.device("cpu"))
    assert not pinned and len(list(on_cpu.train_loader)) > 0
    job = task.build(cfg, torch.device("cuda"))  # nothing here touches the GPU but the pinning
    batches = list(job.train_loader) + [job.test_loader._collated[0]]
    assert batches and all(id(t) in pinned for (src, lengths, prev), target in batches
                           for t in (src, lengths, prev, target))
