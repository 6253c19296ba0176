"""Host syncs in the translation model and beam search (GPU speed: a sync stalls the host until the device
catches up, so the host can no longer queue kernels ahead).

There is no GPU in CI, so `HostSyncs` spots, on CPU, what would sync on CUDA:
- Python-level calls that read device values on the host: `Tensor.item/tolist/cpu/numpy`, `bool()`,
  `int()`, `float()`, `index()` of a tensor, `Tensor.nonzero`/`torch.nonzero`, and `torch.tensor(...)` (a
  host-to-device copy, which `torch.cuda.set_sync_debug_mode` reports too);
- aten ops, through a `TorchDispatchMode`, whose output size or value the host must know:
  `_local_scalar_dense` (what `.item()`/`bool()` run), `nonzero`, `masked_select`, `repeat_interleave` by a
  tensor, `unique`, `equal`, `is_nonzero`, and indexing by a boolean mask (`x[mask]`; `x[mask] = scalar`
  is `masked_fill_`, no sync).
A Python-level call counts once (the ops it runs are not counted again).
Where CUDA exists the same forward also runs under `torch.cuda.set_sync_debug_mode("error")`.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tasks.translation import beam as beam_module
from tasks.translation.beam import beam_search
from tasks.translation.data import EOS, PAD, pad_right
from tasks.translation.model import create_transformer, make_positions, sinusoidal_table
from corpus import random_sources

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "equal", "is_nonzero", "allclose"}


def _bool_indexing(name: str, args: tuple) -> bool:
    if name not in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return False
    indices = [i for i in args[1] if i is not None]
    if not any(i.dtype in (torch.bool, torch.uint8) for i in indices):
        return False
    # x[mask] = scalar runs as masked_fill_ (no sync)
    return not (name != "index" and len(indices) == 1 and args[2].numel() == 1)


class HostSyncs(TorchDispatchMode):
    """Records (or, with raise_=True, raises on) what would be a host sync on CUDA; `events` lists them."""

    def __init__(self, raise_: bool = False):
        super().__init__()
        self.raise_, self.events, self._inside = raise_, [], 0

    def record(self, what: str) -> None:
        if self.raise_:
            raise AssertionError(f"host sync: {what}")
        self.events.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside:
            if name in SYNC_OPS or (name == "repeat_interleave" and isinstance(args[0], torch.Tensor)
                                    and (kwargs or {}).get("output_size") is None and len(args) < 3):
                self.record(f"aten.{name}")
            elif _bool_indexing(name, args):
                self.record(f"aten.{name} by a boolean mask")
        return func(*args, **(kwargs or {}))

    def _wrap(self, owner, attr: str, label: str, applies=lambda *a, **k: True):
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            if self._inside or not applies(*args, **kwargs):
                return original(*args, **kwargs)
            self.record(label)
            self._inside += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._inside -= 1
        return original, wrapper

    @contextlib.contextmanager
    def patched(self):
        patches = [(torch.Tensor, m, *self._wrap(torch.Tensor, m, f"Tensor.{m}")) for m in SYNC_METHODS]
        patches += [(torch, "nonzero", *self._wrap(torch, "nonzero", "torch.nonzero")),
                    (torch, "tensor", *self._wrap(torch, "tensor", "torch.tensor (host-to-device copy)")),
                    (torch, "as_tensor", *self._wrap(torch, "as_tensor", "torch.as_tensor (host-to-device copy)",
                                                      lambda data, *a, **k: not isinstance(data, torch.Tensor)))]
        own = [attr in vars(owner) for owner, attr, _, _ in patches]
        for owner, attr, _, wrapper in patches:
            setattr(owner, attr, wrapper)
        try:
            with self:
                yield self
        finally:
            for (owner, attr, original, _), was_own in zip(patches, own):
                if was_own:
                    setattr(owner, attr, original)
                else:
                    delattr(owner, attr)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one torch thread."""


def padded_batch(seed: int, pads: bool = True, tgt_vocab: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources right-padded (or all of one length) and teacher-forcing inputs, one of them padded."""
    src = pad_right(random_sources(5, 40, seed, *((2, 9) if pads else (6, 6))))
    g = torch.Generator().manual_seed(seed + 1)
    prev = torch.randint(4, tgt_vocab, (5, 7), generator=g)
    prev[:, 0] = EOS
    prev[0, 5:] = PAD
    return src, prev


def tiny_model(seed: int, tgt_vocab: int = 30, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_transformer("transformer_tiny", 40, tgt_vocab, **overrides)


# ------------------------------------------------------------------------------------ the old behaviour

def _old_positions(emb, tokens: torch.Tensor, step: int | None = None) -> torch.Tensor:
    """The old SinusoidalPositionalEmbedding.forward: a table sized from `int(positions.max())`."""
    def table(max_pos: int) -> torch.Tensor:
        return sinusoidal_table(max_pos + 1, emb.dim, emb.padding_idx).to(emb.table)
    if step is not None:
        pos = emb.padding_idx + 1 + step
        return table(pos)[pos].expand(tokens.size(0), 1, -1)
    positions = make_positions(tokens, emb.padding_idx)
    return table(int(positions.max()))[positions]


def _old_encoder_forward(enc, src_tokens: torch.Tensor):
    """The old Encoder.forward: no mask (and no zeroing) when the batch has no pads."""
    padding_mask = src_tokens.eq(enc.padding_idx)
    x = enc.embed_scale * enc.embed_tokens(src_tokens) + enc.embed_positions(src_tokens)
    x = enc.dropout(x)
    has_pads = bool(padding_mask.any())
    if has_pads:
        x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
    for layer in enc.layers:
        x = layer(x, padding_mask if has_pads else None)
    return x, (padding_mask if has_pads else None)


def as_old_model(model):
    """The model with its old forward functions (instance attributes shadow the methods)."""
    import types
    model.encoder.forward = types.MethodType(_old_encoder_forward, model.encoder)
    for emb in (model.encoder.embed_positions, model.decoder.embed_positions):
        emb.forward = types.MethodType(_old_positions, emb)
    return model


def _old_restrict(lprobs, step, max_len, min_len, eos, pad):
    lprobs[:, pad] = -math.inf
    if step < min_len:
        lprobs[:, eos] = -math.inf
    force = max_len <= step
    if bool(force.any()):
        eos_lp = lprobs[force, eos]
        lprobs[force] = -math.inf
        lprobs[force, eos] = eos_lp


def _old_finalize(finalized, eos_mask, cand_scores, cand_rows, tokens, active, step, beam, lenpen):
    hits = eos_mask[:, :beam].nonzero().tolist()
    if hits:
        cpu_scores = cand_scores.cpu()
        cpu_rows = cand_rows.cpu()
        prefix = tokens[:, 1: step + 1].cpu()
        for s, j in hits:
            sent = int(active[s])
            if len(finalized[sent]) < beam:
                finalized[sent].append({"tokens": prefix[cpu_rows[s, j]].tolist(),
                                        "score": float(cpu_scores[s, j]) / (step + 1) ** lenpen})


@torch.no_grad()
def old_beam_search(model, src_tokens, beam=5, lenpen=1.0, max_len_a=0.0, max_len_b=200, min_len=1, eos=EOS,
                    pad=PAD):
    """The old beam_search (finished hypotheses as Python lists, several host syncs a step)."""
    model.eval()
    bsz = src_tokens.size(0)
    device = src_tokens.device
    max_len = beam_module._max_lens(model, src_tokens, max_len_a, max_len_b, pad)
    state = model.start_decoding(src_tokens)
    state.reorder(torch.arange(bsz, device=device).repeat_interleave(beam))
    steps = int(max_len.max()) + 1
    tokens = torch.full((bsz * beam, steps + 1), pad, dtype=torch.long, device=device)
    tokens[:, 0] = eos
    scores = torch.zeros(bsz * beam, device=device)
    active = torch.arange(bsz, device=device)
    finalized: list[list[dict]] = [[] for _ in range(bsz)]
    n = bsz
    for step in range(steps):
        lprobs = F.log_softmax(model.decode_step(tokens[:, step], state).float(), dim=-1)
        lprobs[lprobs != lprobs] = -math.inf
        _old_restrict(lprobs, step, max_len[active].repeat_interleave(beam), min_len, eos, pad)
        vocab = lprobs.size(1)
        if step == 0:
            cand = lprobs.view(n, beam, vocab)[:, 0]
        else:
            cand = (scores.unsqueeze(1) + lprobs).view(n, beam * vocab)
        cand_scores, cand_idx = cand.topk(min(2 * beam, cand.size(1) - 1), dim=1)
        cand_beams = torch.div(cand_idx, vocab, rounding_mode="floor")
        cand_tokens = cand_idx % vocab
        cand_rows = cand_beams + (torch.arange(n, device=device) * beam).unsqueeze(1)
        eos_mask = cand_tokens.eq(eos) & cand_scores.ne(-math.inf)
        _old_finalize(finalized, eos_mask, cand_scores, cand_rows, tokens, active, step, beam, lenpen)
        done = torch.tensor([len(finalized[int(i)]) >= beam for i in active.tolist()], device=device)
        done |= max_len[active] <= step
        if bool(done.all()):
            break
        k = cand_scores.size(1)
        key = eos_mask.long() * k + torch.arange(k, device=device)
        sel = key.topk(beam, dim=1, largest=False).indices
        rows, new_tokens, new_scores = cand_rows.gather(1, sel), cand_tokens.gather(1, sel), cand_scores.gather(1, sel)
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            rows, new_tokens, new_scores = rows[keep], new_tokens[keep], new_scores[keep]
            active = active[keep]
            n = active.numel()
        order = rows.reshape(-1)
        tokens = tokens.index_select(0, order)
        tokens[:, step + 1] = new_tokens.reshape(-1)
        scores = new_scores.reshape(-1)
        state.reorder(order)
    return [max(h, key=lambda x: x["score"]) if h else {"tokens": [], "score": -math.inf} for h in finalized]


# ----------------------------------------------------------------------------------------------- the guard

def test_the_guard_sees_the_syncs_it_names():
    x, mask = torch.randn(3, 4), torch.tensor([True, False, True])
    for sync in (lambda: bool(mask.any()), lambda: int(x.argmax()), lambda: float(x.sum()), lambda: x.max().item(),
                 lambda: x.tolist(), lambda: x.cpu(), lambda: mask.nonzero(), lambda: torch.nonzero(mask),
                 lambda: x[mask], lambda: x[mask, 0], lambda: torch.where(mask), lambda: x.masked_select(x > 0),
                 lambda: torch.tensor([1, 2]), lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 0, 2])),
                 lambda: x.unique(), lambda: torch.equal(x, x), lambda: [1, 2][torch.tensor(0)]):
        with HostSyncs(raise_=True).patched(), pytest.raises(AssertionError, match="host sync"):
            sync()
    guard, rows = HostSyncs(), torch.tensor([0, 2])
    with guard.patched():  # not syncs: device-side reductions, masked fills, gathers, shapes
        x.masked_fill_(x > 2, 0.0)
        x[x != x] = 0.0
        x[rows], x.any(), mask.sum(), x.size(0), torch.arange(3).repeat_interleave(2)
        bool(mask.any())  # ... but this is: counted once, not again as aten._local_scalar_dense
    assert guard.events == ["Tensor.__bool__"]
    assert torch.Tensor.__bool__ is torch._C.TensorBase.__bool__ and "__bool__" not in vars(torch.Tensor)


# ----------------------------------------------------------------------------------------------- model

def test_forward_and_incremental_step_have_no_host_syncs():
    model = tiny_model(0).train()
    src, prev = padded_batch(0)
    assert src.eq(PAD).any() and prev.eq(PAD).any()
    order = torch.tensor([4, 4, 0, 1])
    with HostSyncs(raise_=True).patched():
        logits = model(src, None, prev)
        logits.sum().backward()  # autograd of the forward too
        decode_a_few_steps(model, src, prev, order)
    assert logits.shape == (5, 7, 30)


def decode_a_few_steps(model, src, prev, order) -> None:
    """In eval mode: encode, three incremental decoder steps, a beam reorder, one more step."""
    model.eval()
    with torch.no_grad():
        state = model.start_decoding(src)
        for t in range(3):
            model.decode_step(prev[:, t], state)
        state.reorder(order)
        model.decode_step(prev[:, 3].index_select(0, order), state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forward_and_incremental_step_pass_cuda_sync_debug_mode():
    model = tiny_model(0).cuda().train()
    src, prev = (t.cuda() for t in padded_batch(0))
    order = torch.tensor([4, 4, 0, 1], device="cuda")
    model(src, None, prev).sum().backward()  # warm-up: lazy initialisation outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(src, None, prev).sum().backward()
        decode_a_few_steps(model, src, prev, order)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("seed,pads", [(0, True), (1, True), (2, False)])
def test_forward_equals_the_old_forward(seed, pads):
    new, old = tiny_model(seed), as_old_model(tiny_model(seed))
    src, prev = padded_batch(seed, pads)
    assert bool(src.eq(PAD).any()) == pads
    out = {}
    for name, model in (("new", new), ("old", old)):
        torch.manual_seed(100 + seed)  # the same dropout masks
        train = model.train()(src, None, prev).detach()
        with torch.no_grad():
            full = model.eval()(src, None, prev)
            state = model.start_decoding(src)
            steps = torch.stack([model.decode_step(prev[:, t], state) for t in range(prev.size(1))], 1)
        out[name] = (train, full, steps)
    for a, b in zip(out["new"], out["old"]):
        assert torch.isfinite(a).all()  # padded positions included
        assert (a - b).abs().max() <= 1e-6


def test_position_table_is_sized_once_and_stays_out_of_the_state_dict():
    model = tiny_model(0, tgt_vocab=40, max_positions=8)
    assert list(model.state_dict()) == [n for n, _ in model.named_parameters()]  # as before: parameters only
    assert not any("embed_positions" in k for k in model.state_dict())
    emb = model.encoder.embed_positions
    assert emb.table.shape == (8 + PAD + 1, 64) and "embed_positions.table" in dict(model.encoder.named_buffers())
    table = emb.table
    src = pad_right(random_sources(3, 40, 0, 7, 7))  # 8 tokens with </s>: the longest the table holds
    model(src, None, src[:, :8])
    assert emb.table is table
    with pytest.raises(ValueError, match="at most 8"):
        model(pad_right(random_sources(2, 40, 0, 8, 8)), None, src)
    hyps = beam_search(model, src, beam=2, max_len_b=200)  # capped at max positions - 1
    assert max(len(h["tokens"]) for h in hyps) <= 7


# ----------------------------------------------------------------------------------------------- beam search

def peaked_model(seed: int, tgt_vocab: int) -> torch.nn.Module:
    """A random tiny model in float64 with sharpened output logits and a stronger </s>: beams end at varied
    lengths, a sentence collects finished hypotheses over several steps (some worse than its best, some
    past its `beam`)."""
    model = tiny_model(seed, tgt_vocab).double().eval()
    with torch.no_grad():
        model.decoder.embed_tokens.weight.mul_(4.0)
        model.decoder.embed_tokens.weight[EOS].mul_(2.0)
    return model


BEAM_SETTINGS = [dict(beam=4, lenpen=1.0, max_len_a=1.2, max_len_b=3), dict(beam=5, lenpen=0.5, max_len_b=12),
                 dict(beam=2, lenpen=2.0, max_len_a=1.0, max_len_b=1), dict(beam=1, max_len_a=1.5, max_len_b=2),
                 dict(beam=6, max_len_b=30), dict(beam=3, lenpen=0.0, max_len_a=1.0, max_len_b=4)]


@pytest.mark.parametrize("seed,tgt_vocab", [(0, 8), (1, 14), (2, 8), (3, 14)])
def test_beam_search_equals_the_old_beam_search(seed, tgt_vocab):
    model = peaked_model(seed, tgt_vocab)
    src = pad_right(random_sources(7, 40, seed, 1, 10))
    lengths = set()
    for kw in BEAM_SETTINGS:
        new, old = beam_search(model, src, **kw), old_beam_search(model, src, **kw)
        assert new == old, kw  # the same tokens and the same float scores, bit for bit
        lengths |= {len(h["tokens"]) for h in new}
    assert len(lengths) >= 4


def syncs_per_step(search, model, src, **kw) -> tuple[int, list[int], int]:
    """Host syncs of one beam search: (before the first step, per step but the last, the last step and after)."""
    guard, marks, step = HostSyncs(), [], model.decode_step
    model.decode_step = lambda *a: (marks.append(len(guard.events)), step(*a))[1]
    try:
        with guard.patched():
            search(model, src, **kw)
    finally:
        del model.decode_step
    marks.append(len(guard.events))
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    return marks[0], per_step[:-1], per_step[-1]


def test_beam_search_has_one_host_sync_per_step():
    model = peaked_model(0, 10)
    src = pad_right(random_sources(7, 40, 0, 1, 10))
    before, steps, last = syncs_per_step(beam_search, model, src, beam=4, max_len_a=1.2, max_len_b=3)
    assert len(steps) >= 10
    assert before == 1 and set(steps) == {1} and last == 1 + 2  # max_len.max(); keep rows; the results
    # the old beam search: 7 a step without, and more with, finished hypotheses
    before, steps, last = syncs_per_step(old_beam_search, model, src, beam=4, max_len_a=1.2, max_len_b=3)
    assert before == 1 and min(steps) == 7 and max(steps) > 20
