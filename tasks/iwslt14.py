"""`iwslt14-de-en` (ASAM Table 5): IWSLT'14 German -> English with fairseq's `transformer_iwslt_de_en`.

Data: a corpus prepared as fairseq's `prepare-iwslt14.sh` leaves it, under `--data-dir`:
`{train,valid,test}.{de,en}` (Moses-tokenized, lower-cased, joint BPE with "@@ " continuations, one
sentence per line), `code` (the BPE merges), `counts.json`, and a `SYNTHETIC` marker for generated data.
`bench data prepare iwslt14 --raw DIR --out DIR` makes it from the raw archive, `bench data fake iwslt14
DIR` makes a synthetic one. The dictionaries are built from the training side of each language as
fairseq-preprocess builds them (see `tasks/translation/data.py`).

Training: batches of about `--batch-size` tokens (fairseq's --max-tokens), the label-smoothed cross
entropy of fairseq (`label_smoothed_nll_loss`), averaged over the non-pad target tokens of the batch
(`count` = that number, so epoch averages are per token).

Every epoch `evaluate` reports on the validation set: `valid_loss` (cross entropy per target token, nats,
no smoothing), `valid_bleu` (tokenized BLEU, BPE removed, as fairseq reports IWSLT'14) and
`valid_sacrebleu` (Moses-detokenized, sacrebleu 13a), decoding with beam search (`eval_beam`, 5, and
fairseq's example `--eval-bleu-args` max_len_a 1.2, max_len_b 10). The weights of the best `valid_bleu` are
kept (a CPU copy, saved in the checkpoint too: a resumed run keeps them); `finalize` decodes the test set
with them (`test_beam` 5, fairseq-generate's defaults max_len_a 0, max_len_b 200, lenpen 1) -> `test_bleu`,
`test_sacrebleu`, `best_epoch`.
Under torchrun the validation loss is summed over ranks and the sentences to decode are split across
ranks and gathered, so every rank gets the same scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench import distributed as D
from bench.config import load_toml
from bench.errors import UserError
from bench.registry import register_task
from bench.task import SYNTHETIC_MARKER, DataStatus, Job, Task, holding
from tasks.translation.beam import detokenized_bleu, remove_bpe, tokenized_bleu, translate
from tasks.translation.data import PAD, Dictionary, PairDataset, TokenBatchLoader, read_lines
from tasks.translation.fake import write_fake_archive
from tasks.translation.model import CONFIGS, create_transformer
from tasks.translation.prepare import prepare_iwslt14

RECIPE = load_toml(Path(__file__).with_name("iwslt14.toml"))
MODELS = ["transformer", "transformer_tiny"]
SRC, TGT = "de", "en"
SPLITS = ("train", "valid", "test")
HOW_TO_GET = "run `bench data prepare iwslt14 --raw DIR --out DIR` (or `bench data fake iwslt14 DIR`)"
assert set(MODELS) <= set(CONFIGS)


# ----------------------------------------------------------------------------------------------- loss

def label_smoothed_nll_loss(lprobs: torch.Tensor, target: torch.Tensor, epsilon: float, ignore_index: int = PAD,
                            legacy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq's label_smoothed_nll_loss, summed: (loss, nll_loss) over the non-pad targets.

    fairseq >= 0.12 (and current main): eps_i = eps / (V - 1), loss = (1 - eps - eps_i) nll + eps_i sum_v(-lp_v),
    i.e. the target gets 1 - eps and every other class eps / (V - 1). `legacy=True`: older fairseq's
    eps_i = eps / V, loss = (1 - eps) nll + eps_i sum_v(-lp_v)."""
    target = target.unsqueeze(-1)
    nll = -lprobs.gather(dim=-1, index=target)
    smooth = -lprobs.sum(dim=-1, keepdim=True)
    pad_mask = target.eq(ignore_index)
    nll = nll.masked_fill(pad_mask, 0.0).sum()
    smooth = smooth.masked_fill(pad_mask, 0.0).sum()
    vocab = lprobs.size(-1)
    if legacy:
        eps_i = epsilon / vocab
        return (1.0 - epsilon) * nll + eps_i * smooth, nll
    eps_i = epsilon / (vocab - 1)
    return (1.0 - epsilon - eps_i) * nll + eps_i * smooth, nll


class LabelSmoothedCrossEntropy:
    """Training loss(logits (B, T, V), target (B, T)): fairseq's label-smoothed loss per non-pad token."""

    def __init__(self, epsilon: float, pad: int = PAD):
        self.epsilon, self.pad = epsilon, pad

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        lprobs = F.log_softmax(logits.float(), dim=-1)
        flat = target.reshape(-1)
        loss, _ = label_smoothed_nll_loss(lprobs.view(-1, lprobs.size(-1)), flat, self.epsilon, self.pad)
        return loss / flat.ne(self.pad).sum().clamp(min=1)


def count_tokens(target: torch.Tensor) -> torch.Tensor:
    return target.ne(PAD).sum()


# ----------------------------------------------------------------------------------------------- data

@dataclass
class Corpus:
    root: Path
    src_dict: Dictionary
    tgt_dict: Dictionary
    train: PairDataset
    valid: PairDataset
    test: PairDataset
    synthetic: bool


_CACHE: dict[tuple, Corpus] = {}


def corpus_root(data_dir: str | Path) -> Path:
    """`data_dir` itself, or its `iwslt14.tokenized.de-en/` (prepare-iwslt14.sh's folder name)."""
    root = Path(data_dir)
    for candidate in (root, root / "iwslt14.tokenized.de-en"):
        if all((candidate / f"{s}.{l}").is_file() for s in SPLITS for l in (SRC, TGT)):
            return candidate
    return root


def load_corpus(data_dir: str | Path) -> Corpus:
    root = corpus_root(data_dir)
    files = [root / f"{s}.{l}" for s in SPLITS for l in (SRC, TGT)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"IWSLT'14 de-en corpus not found in {root}/ (missing {', '.join(missing)}); {HOW_TO_GET}")
    key = (str(root.resolve()), tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    if key in _CACHE:
        return _CACHE[key]
    lines = {(s, l): read_lines(root / f"{s}.{l}") for s in SPLITS for l in (SRC, TGT)}
    for s in SPLITS:
        if len(lines[s, SRC]) != len(lines[s, TGT]):
            raise UserError(f"{root}/{s}.{SRC} has {len(lines[s, SRC])} lines but {s}.{TGT} has "
                            f"{len(lines[s, TGT])}; {HOW_TO_GET}")
    src_dict = Dictionary.build(lines["train", SRC])
    tgt_dict = Dictionary.build(lines["train", TGT])
    sets = {s: PairDataset.from_lines(lines[s, SRC], lines[s, TGT], src_dict, tgt_dict) for s in SPLITS}
    corpus = Corpus(root, src_dict, tgt_dict, sets["train"], sets["valid"], sets["test"],
                    (root / SYNTHETIC_MARKER).exists())
    _CACHE.clear()  # keep one corpus in memory
    _CACHE[key] = corpus
    return corpus


def _gather(items: list) -> list:
    if not D.is_distributed():
        return items
    parts: list = [None] * D.world_size()
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


# ----------------------------------------------------------------------------------------------- task

@register_task("iwslt14-de-en", aliases=("iwslt14",),
               description="IWSLT'14 German-English, ASAM Table 5 (fairseq transformer_iwslt_de_en, BLEU)")
class IWSLT14Task(Task):
    base_optimizer = "adam"
    # decoding: every epoch on the validation set (fairseq's example --eval-bleu-args) and at the end on test
    eval_beam = 5
    eval_max_len_a, eval_max_len_b = 1.2, 10
    test_beam = 5
    test_max_len_a, test_max_len_b = 0.0, 200
    lenpen = 1.0

    def recipe(self, model: str | None = None) -> dict[str, Any]:
        return {**RECIPE, "models": list(MODELS)}

    def decode(self, model, data: PairDataset, tgt_dict: Dictionary, beam: int, max_len_a: float, max_len_b: int,
               max_tokens: int) -> dict[str, float]:
        """Tokenized and detokenized BLEU of `model` on `data` (sentences split over ranks, gathered)."""
        device = next(model.parameters()).device
        mine = list(range(D.rank(), len(data), D.world_size()))
        hyps = translate(model, [data.src[i] for i in mine], beam=beam, max_tokens=max_tokens, lenpen=self.lenpen,
                         max_len_a=max_len_a, max_len_b=max_len_b, device=device)
        pairs = sorted(_gather([(i, remove_bpe(tgt_dict.string(h))) for i, h in zip(mine, hyps)]))
        hyp_text = [h for _, h in pairs]
        refs = [remove_bpe(line) for line in data.tgt_lines]
        return {"bleu": tokenized_bleu(hyp_text, refs), "sacrebleu": detokenized_bleu(hyp_text, refs, TGT)}

    def build(self, cfg, device: torch.device) -> Job:
        corpus = load_corpus(cfg.data_dir)
        pin = device.type == "cuda"
        train = TokenBatchLoader(corpus.train, cfg.per_replica_batch, shuffle=True, seed=cfg.seed, pin=pin)
        valid = TokenBatchLoader(corpus.valid, cfg.batch_size, shuffle=False, rank=0, world=1, pin=pin)
        model = create_transformer(cfg.model, len(corpus.src_dict), len(corpus.tgt_dict))
        # What the task keeps between epochs, hence saved in the checkpoint (Job.state_dict): the best
        # validation BLEU so far, its epoch and its weights (a CPU copy), and the epochs evaluated.
        best: dict[str, Any] = {"bleu": -math.inf, "epoch": 0, "weights": None, "evaluated": 0}

        @torch.no_grad()
        def evaluate(model) -> dict[str, float]:
            model.eval()
            best["evaluated"] += 1
            dev = next(model.parameters()).device
            sums = torch.zeros(2, dtype=torch.float64, device=dev)
            for b in valid.order()[D.rank()::D.world_size()]:
                (src, lengths, prev), target = valid._collated[b]
                src, lengths, prev, target = (t.to(dev, non_blocking=True) for t in (src, lengths, prev, target))
                logits = model(src, lengths, prev)
                lprobs = F.log_softmax(logits.float(), dim=-1)
                _, nll = label_smoothed_nll_loss(lprobs.view(-1, lprobs.size(-1)), target.reshape(-1), 0.0)
                sums[0] += nll.double()
                sums[1] += target.ne(PAD).sum()
            D.all_reduce_sum(sums)
            scores = self.decode(model, corpus.valid, corpus.tgt_dict, self.eval_beam, self.eval_max_len_a,
                                 self.eval_max_len_b, cfg.batch_size)
            if scores["bleu"] > best["bleu"]:
                best.update(bleu=scores["bleu"], epoch=best["evaluated"],
                            weights={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
            return {"valid_loss": sums[0].item() / max(sums[1].item(), 1), "valid_bleu": scores["bleu"],
                    "valid_sacrebleu": scores["sacrebleu"]}

        @torch.no_grad()
        def finalize(model) -> dict[str, Any]:
            final = None
            if best["weights"] is not None:
                final = {k: v.detach().clone() for k, v in model.state_dict().items()}
                model.load_state_dict(best["weights"])
            scores = self.decode(model, corpus.test, corpus.tgt_dict, self.test_beam, self.test_max_len_a,
                                 self.test_max_len_b, cfg.batch_size)
            if final is not None:
                model.load_state_dict(final)
            return {"test_bleu": scores["bleu"], "test_sacrebleu": scores["sacrebleu"], "best_epoch": best["epoch"]}

        return Job(model=model, train_loader=train, test_loader=valid, loss_fn=LabelSmoothedCrossEntropy(
                   cfg.label_smoothing), num_train=len(corpus.train), evaluate=evaluate, track=("valid_bleu",),
                   count=count_tokens, finalize=finalize, state_dict=lambda: dict(best),
                   load_state_dict=best.update, synthetic=corpus.synthetic, fixed_batch=False,
                   info={"train_size": len(corpus.train), "valid_size": len(corpus.valid),
                         "test_size": len(corpus.test), "src_vocab": len(corpus.src_dict),
                         "tgt_vocab": len(corpus.tgt_dict)})

    def data_status(self, data_dir: str | Path) -> DataStatus:
        names = [f"{s}.{lang}" for s in SPLITS for lang in (SRC, TGT)]
        return DataStatus(holding(corpus_root(data_dir), names), f"{Path(data_dir)}/{{train,valid,test}}.{{de,en}}",
                          HOW_TO_GET)

    def make_fake(self, out_dir: str, train: int = 400, test: int = 50, seed: int = 0, **_: Any) -> str:
        if train < 1 or test < 1:
            raise UserError("--train and --test must be >= 1")
        out = Path(out_dir)
        raw = write_fake_archive(out / "raw", n_train=train, n_test=test, seed=seed)
        counts = prepare_iwslt14(raw, out, bpe_merges=200)
        return f"wrote a synthetic IWSLT'14 de-en corpus to {out} ({_counts_text(counts)}); --data-dir {out}"

    def prepare(self, raw: str, out: str, bpe_merges: int = 10000) -> str:
        """Prepare the real corpus from the raw IWSLT'14 archive (what fairseq's prepare-iwslt14.sh does)."""
        counts = prepare_iwslt14(raw, out, bpe_merges=bpe_merges)
        return f"prepared IWSLT'14 de-en in {out} ({_counts_text(counts)}); --data-dir {out}"


def _counts_text(counts: Any) -> str:
    if isinstance(counts, dict):
        return ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, (dict, list)))
    return str(counts)
