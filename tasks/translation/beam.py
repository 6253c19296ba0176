"""Decoding and scoring: batched beam search and greedy decoding on the incremental decoder, and BLEU.

Beam search follows fairseq's `SequenceGenerator` + `search.BeamSearch`:
- step 0 expands only the first beam; each step takes the top 2 x beam candidates over beam x vocabulary
  (cumulative log-probabilities); candidates that end in `</s>` among the top `beam` are finished
  hypotheses, their score normalised by length^lenpen (length counts the `</s>`); the next beams are the
  best `beam` candidates that do not end in `</s>`; a sentence is done once it has `beam` finished
  hypotheses; the result is the finished hypothesis with the best normalised score;
- `<pad>` is never generated, `</s>` is not allowed before `min_len` (1) tokens, and at step `max_len`
  `</s>` is forced. max_len = min(max_len_a x source length + max_len_b, max positions - 1), source
  length counting its `</s>`. Difference from fairseq: fairseq uses the batch's padded source width, we use
  each sentence's own length, so a sentence decodes the same whatever batch it is in.

Finished sentences leave the batch (their rows are dropped from the cached keys/values), as in fairseq.
Hypotheses are returned as token lists without `</s>`, with their normalised score. Finished hypotheses
are kept on the device (per sentence: their number and the best one), so a decoding step costs one host
sync, where it used to cost 7 and more (see `beam_search`).

BLEU, as fairseq reports it on IWSLT'14 (`tokenized_bleu`): BPE removed ("@@ " joins), then sacrebleu
on the tokenized, lower-cased text with `tokenize="none"`. Beside it `detokenized_bleu` (sacreBLEU proper):
Moses-detokenized text (sacremoses, English) scored with sacrebleu's default 13a tokenization.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from tasks.translation.data import EOS, PAD, batch_by_size, pad_right


def _max_lens(model, src_tokens: torch.Tensor, max_len_a: float, max_len_b: int, pad: int) -> torch.Tensor:
    src_len = src_tokens.ne(pad).sum(1)
    cap = model.max_positions() - 1
    return torch.clamp((max_len_a * src_len.double() + max_len_b).long(), max=cap)


def _restrict(lprobs: torch.Tensor, step: int, max_len: torch.Tensor, min_len: int, eos: int, pad: int) -> None:
    """In place: no <pad>; no </s> before min_len; rows at their max_len keep only </s>. No host sync (a
    masked fill for the forced rows, not `if force.any()` and boolean indexing)."""
    lprobs[:, pad] = -math.inf
    if step < min_len:
        lprobs[:, eos] = -math.inf
    eos_lp = lprobs[:, eos].clone()
    lprobs.masked_fill_((max_len <= step).unsqueeze(1), -math.inf)
    lprobs[:, eos] = eos_lp


def _candidates(lprobs: torch.Tensor, scores: torch.Tensor, step: int, n: int,
                beam: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best 2 x beam extensions of each sentence's beams: (scores, tokens, rows of the token buffer)."""
    vocab = lprobs.size(1)
    if step == 0:  # all beams are equal: expand the first one only
        cand = lprobs.view(n, beam, vocab)[:, 0]
    else:
        cand = (scores.unsqueeze(1) + lprobs).view(n, beam * vocab)
    cand_scores, cand_idx = cand.topk(min(2 * beam, cand.size(1) - 1), dim=1)
    cand_beams = torch.div(cand_idx, vocab, rounding_mode="floor")
    cand_rows = cand_beams + (torch.arange(n, device=lprobs.device) * beam).unsqueeze(1)
    return cand_scores, cand_idx % vocab, cand_rows


def _next_beams(eos_mask: torch.Tensor, cand_scores: torch.Tensor, cand_tokens: torch.Tensor,
                cand_rows: torch.Tensor, beam: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best `beam` candidates that do not end in </s>: (rows, tokens, scores), each (n, beam)."""
    k = cand_scores.size(1)
    key = eos_mask.long() * k + torch.arange(k, device=eos_mask.device)
    sel = key.topk(beam, dim=1, largest=False).indices
    return cand_rows.gather(1, sel), cand_tokens.gather(1, sel), cand_scores.gather(1, sel)


class _Finished:
    """Finished hypotheses, on the device, per original sentence: how many (a sentence is done at `beam`)
    and the best one (normalised score, tokens, length) - the only one beam search returns."""

    def __init__(self, bsz: int, width: int, beam: int, lenpen: float, pad: int, device: torch.device):
        self.beam, self.lenpen = beam, lenpen
        self.count = torch.zeros(bsz, dtype=torch.long, device=device)
        self.score = torch.full((bsz,), -math.inf, dtype=torch.float64, device=device)
        self.length = torch.zeros(bsz, dtype=torch.long, device=device)
        self.tokens = torch.full((bsz, width), pad, dtype=torch.long, device=device)

    def add(self, active: torch.Tensor, hit: torch.Tensor, hit_scores: torch.Tensor, hit_rows: torch.Tensor,
            tokens: torch.Tensor, step: int) -> None:
        """hit (n, beam): candidates ending in </s>, taken in candidate order while a sentence has fewer than
        `beam`; score = log-prob / (step + 1)^lenpen in float64 (as Python floats); ties keep the earlier."""
        count = self.count[active]
        taken = hit & (count.unsqueeze(1) + hit.long().cumsum(1) <= self.beam)
        norm = (hit_scores.double() / (step + 1) ** self.lenpen).masked_fill(~taken, -math.inf)
        j = norm.argmax(dim=1, keepdim=True)  # the first of equal maxima
        top = norm.gather(1, j).squeeze(1)
        old_score = self.score[active]
        better = top > old_score
        prefix = tokens.index_select(0, hit_rows.gather(1, j).squeeze(1))[:, 1:]  # columns past `step`: <pad>
        self.count.index_copy_(0, active, count + taken.sum(1))
        self.score.index_copy_(0, active, torch.where(better, top, old_score))
        self.length.index_copy_(0, active, torch.where(better, step, self.length[active]))
        self.tokens.index_copy_(0, active, torch.where(better.unsqueeze(1), prefix, self.tokens[active]))

    def results(self) -> list[dict]:
        """Two host syncs: tokens with lengths, scores. No finished hypothesis: tokens [], score -inf."""
        rows = torch.cat([self.length.unsqueeze(1), self.tokens], dim=1).tolist()
        return [{"tokens": row[1: 1 + row[0]], "score": score} for row, score in zip(rows, self.score.tolist())]


@torch.no_grad()
def beam_search(model, src_tokens: torch.Tensor, beam: int = 5, lenpen: float = 1.0, max_len_a: float = 0.0,
                max_len_b: int = 200, min_len: int = 1, eos: int = EOS, pad: int = PAD) -> list[dict]:
    """Batched beam search; -> per sentence {"tokens": [...] (no </s>), "score": normalised log-prob}.

    Host syncs: one per decoding step, the `nonzero` of the sentences still decoding, which tells at once
    whether all are done and which rows stay (the batch shrinks, so the host must know its new size; the
    model's step itself has none). Finished hypotheses stay on the device (`_Finished`). Per call, besides:
    one before the loop (the number of steps, `max_len.max()`) and two after it (the results)."""
    model.eval()
    bsz, device = src_tokens.size(0), src_tokens.device
    max_len = _max_lens(model, src_tokens, max_len_a, max_len_b, pad)
    state = model.start_decoding(src_tokens)
    state.reorder(torch.arange(bsz, device=device).repeat_interleave(beam))
    steps = int(max_len.max()) + 1
    tokens = torch.full((bsz * beam, steps + 1), pad, dtype=torch.long, device=device)
    tokens[:, 0] = eos
    scores = torch.zeros(bsz * beam, device=device)
    active = torch.arange(bsz, device=device)  # original index of each sentence still decoding
    finished = _Finished(bsz, steps, beam, lenpen, pad, device)
    n = bsz
    for step in range(steps):
        lprobs = F.log_softmax(model.decode_step(tokens[:, step], state).float(), dim=-1)
        lprobs.masked_fill_(lprobs.isnan(), -math.inf)
        _restrict(lprobs, step, max_len[active].repeat_interleave(beam), min_len, eos, pad)
        cand_scores, cand_tokens, cand_rows = _candidates(lprobs, scores, step, n, beam)
        eos_mask = cand_tokens.eq(eos) & cand_scores.ne(-math.inf)
        # finished hypotheses: </s> among the top `beam` candidates
        finished.add(active, eos_mask[:, :beam], cand_scores[:, :beam], cand_rows[:, :beam], tokens, step)
        alive = (finished.count[active] < beam) & (max_len[active] > step)
        keep = alive.nonzero().squeeze(1)  # the step's one host sync
        if keep.numel() == 0:
            break
        rows, new_tokens, new_scores = _next_beams(eos_mask, cand_scores, cand_tokens, cand_rows, beam)
        if keep.numel() < n:
            rows, new_tokens, new_scores = rows[keep], new_tokens[keep], new_scores[keep]
            active = active[keep]
            n = keep.numel()
        order = rows.reshape(-1)
        tokens = tokens.index_select(0, order)
        tokens[:, step + 1] = new_tokens.reshape(-1)
        scores = new_scores.reshape(-1)
        state.reorder(order)
    return finished.results()


@torch.no_grad()
def greedy_decode(model, src_tokens: torch.Tensor, lenpen: float = 1.0, max_len_a: float = 0.0,
                  max_len_b: int = 200, min_len: int = 1, eos: int = EOS, pad: int = PAD) -> list[dict]:
    """Arg-max decoding with beam search's rules (no <pad>, min_len, forced </s> at max_len);
    score = sum of log-probabilities (with </s>) / length^lenpen, as beam search scores."""
    model.eval()
    bsz = src_tokens.size(0)
    device = src_tokens.device
    max_len = _max_lens(model, src_tokens, max_len_a, max_len_b, pad)
    state = model.start_decoding(src_tokens)
    prev = torch.full((bsz,), eos, dtype=torch.long, device=device)
    active = torch.arange(bsz, device=device)
    out: list[list[int]] = [[] for _ in range(bsz)]
    total = torch.zeros(bsz, dtype=torch.float64)
    results: list[dict | None] = [None] * bsz
    for step in range(int(max_len.max()) + 1):
        lprobs = F.log_softmax(model.decode_step(prev, state).float(), dim=-1)
        _restrict(lprobs, step, max_len[active], min_len, eos, pad)
        lp, tok = lprobs.max(dim=1)
        keep = []
        for r, (sent, t, v) in enumerate(zip(active.tolist(), tok.tolist(), lp.tolist())):
            total[sent] += v
            if t == eos:
                results[sent] = {"tokens": out[sent], "score": float(total[sent]) / (step + 1) ** lenpen}
            else:
                out[sent].append(t)
                keep.append(r)
        if not keep:
            break
        keep_t = torch.tensor(keep, device=device)
        active, prev = active[keep_t], tok[keep_t]
        if len(keep) < tok.numel():
            state.reorder(keep_t)
    return results  # type: ignore[return-value]


@torch.no_grad()
def translate(model, sources: Sequence[torch.Tensor], beam: int = 5, max_tokens: int = 4096,
              lenpen: float = 1.0, max_len_a: float = 0.0, max_len_b: int = 200,
              device: torch.device | str = "cpu", pad: int = PAD) -> list[list[int]]:
    """Decode encoded source sentences (each ending in </s>) in length-sorted batches of about
    `max_tokens` source tokens; -> token lists in the input order."""
    import numpy as np
    sizes = np.array([len(s) for s in sources], dtype=np.int64)
    out: list[list[int]] = [[] for _ in sources]
    for idx in batch_by_size(sizes, None, max(max_tokens, 1)):
        src = pad_right([sources[i] for i in idx], pad).to(device)
        if beam > 1:
            hyps = beam_search(model, src, beam=beam, lenpen=lenpen, max_len_a=max_len_a, max_len_b=max_len_b)
        else:
            hyps = greedy_decode(model, src, lenpen=lenpen, max_len_a=max_len_a, max_len_b=max_len_b)
        for i, h in zip(idx.tolist(), hyps):
            out[i] = h["tokens"]
    return out


def remove_bpe(line: str, marker: str = "@@ ") -> str:
    """fairseq's subword_nmt post-processing: join "@@ " continuations."""
    return (line + " ").replace(marker, "").rstrip()


def tokenized_bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """BLEU on tokenized text (as fairseq reports for IWSLT'14): sacrebleu with tokenize='none'."""
    import sacrebleu
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)], tokenize="none", force=True).score)


def detokenize(lines: Sequence[str], lang: str = "en") -> list[str]:
    try:
        from sacremoses import MosesDetokenizer
    except ImportError:
        from bench.errors import UserError
        raise UserError("detokenized BLEU needs sacremoses: pip install sacremoses") from None
    md = MosesDetokenizer(lang=lang)
    return [md.detokenize(line.split()) for line in lines]


def detokenized_bleu(hyps: Sequence[str], refs: Sequence[str], lang: str = "en") -> float:
    """sacreBLEU proper: Moses-detokenized text, sacrebleu's default 13a tokenization."""
    import sacrebleu
    return float(sacrebleu.corpus_bleu(detokenize(hyps, lang), [detokenize(refs, lang)]).score)
