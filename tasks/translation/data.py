"""Translation data as fairseq handles it: dictionaries, sentence pairs, batches by token count.

- `Dictionary`: fairseq's `Dictionary` as `fairseq-preprocess` builds it (without `--joined-dictionary`,
  so one per language, from that language's training side): specials `<s>`=0, `<pad>`=1, `</s>`=2,
  `<unk>`=3, then every symbol of the training text by descending count, ties broken by the symbol (the
  order `Counter(dict(sorted(...))).most_common()` gives in fairseq's `finalize`), then `madeupword0000`,
  ... up to a multiple of `padding_factor` = 8 (fairseq-preprocess's default; it is why the IWSLT'14
  dictionaries have 8,848 and 6,632 entries). Lines are encoded by splitting on whitespace, unknown symbols
  map to `<unk>`, and `</s>` is appended.
- `PairDataset`: the encoded (source, target) sentence pairs of one split.
- `TokenBatchLoader`: fairseq's batching by token count. The pairs are sorted by (source length, target
  length) (index as the last key), then cut into batches greedily: a batch grows while
  `sentences x max(max source length, max target length)` stays <= `max_tokens` (lengths include `</s>`;
  a single pair longer than `max_tokens` gets a batch of its own). The batches are fixed once; each epoch
  only their order is shuffled, from (seed, epoch), as fairseq's `EpochBatchIterator` does. Differences
  from fairseq: no `required_batch_size_multiple` rounding of batch sizes to multiples of 8, and ties in
  length are broken by index rather than by a seeded shuffle.
  Under data parallelism (`bench.distributed.world_size()` = W > 1) rank r takes batches r, r + W, ... of
  the epoch's order; the order is first extended by wrapping around to a multiple of W, so that every rank
  runs the same number of steps (a few batches are then seen twice in that epoch).

Batches are `((src_tokens, src_lengths, prev_output_tokens), target)`, every sequence padded on the
RIGHT with `<pad>` (fairseq pads sources on the left by default; with the padding-aware positions and
attention masks of `model.py` the non-pad outputs are the same either way). `target` = the target tokens
followed by `</s>`; `prev_output_tokens` = `</s>` followed by the target tokens (fairseq's
`move_eos_to_beginning`), the decoder's teacher-forcing input.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from bench import distributed as D

BOS, PAD, EOS, UNK = 0, 1, 2, 3


class Dictionary:
    """fairseq's Dictionary: symbol <-> index, with <s>, <pad>, </s>, <unk> first."""

    def __init__(self, bos: str = "<s>", pad: str = "<pad>", eos: str = "</s>", unk: str = "<unk>"):
        self.bos_word, self.pad_word, self.eos_word, self.unk_word = bos, pad, eos, unk
        self.symbols: list[str] = []
        self.count: list[int] = []
        self.indices: dict[str, int] = {}
        self.bos_index = self.add_symbol(bos)
        self.pad_index = self.add_symbol(pad)
        self.eos_index = self.add_symbol(eos)
        self.unk_index = self.add_symbol(unk)
        self.nspecial = len(self.symbols)

    def add_symbol(self, word: str, n: int = 1) -> int:
        if word in self.indices:
            idx = self.indices[word]
            self.count[idx] += n
            return idx
        idx = len(self.symbols)
        self.indices[word] = idx
        self.symbols.append(word)
        self.count.append(n)
        return idx

    def __len__(self) -> int:
        return len(self.symbols)

    def __getitem__(self, idx: int) -> str:
        return self.symbols[idx] if 0 <= idx < len(self.symbols) else self.unk_word

    def index(self, word: str) -> int:
        return self.indices.get(word, self.unk_index)

    def pad(self) -> int:
        return self.pad_index

    def eos(self) -> int:
        return self.eos_index

    def unk(self) -> int:
        return self.unk_index

    @classmethod
    def build(cls, lines: Iterable[str], threshold: int = -1, nwords: int = -1,
              padding_factor: int = 8) -> "Dictionary":
        """A finalized dictionary of the whitespace-separated symbols of `lines` (fairseq-preprocess)."""
        counts: Counter = Counter()
        for line in lines:
            counts.update(line.split())
        return cls.from_counts(counts, threshold, nwords, padding_factor)

    @classmethod
    def from_counts(cls, counts: dict[str, int], threshold: int = -1, nwords: int = -1,
                    padding_factor: int = 8) -> "Dictionary":
        d = cls()
        specials = set(d.symbols)
        # fairseq's finalize(): Counter(dict(sorted(...))).most_common() == sort by (-count, symbol)
        ranked = sorted(((w, c) for w, c in counts.items() if w not in specials), key=lambda wc: (-wc[1], wc[0]))
        if nwords > 0:
            ranked = ranked[: max(nwords - d.nspecial, 0)]
        for word, c in ranked:
            if c >= threshold:
                d.add_symbol(word, c)
        d.pad_to_multiple_(padding_factor)
        return d

    def pad_to_multiple_(self, padding_factor: int) -> None:
        if padding_factor > 1:
            i = 0
            while len(self) % padding_factor != 0:
                self.add_symbol(f"madeupword{i:04d}", n=0)
                i += 1

    def encode_line(self, line: str, append_eos: bool = True) -> torch.Tensor:
        ids = [self.indices.get(w, self.unk_index) for w in line.split()]
        if append_eos:
            ids.append(self.eos_index)
        return torch.tensor(ids, dtype=torch.long)

    def string(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Symbols joined by spaces, without </s>, <pad> and <s> (fairseq's Dictionary.string)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        skip = (self.eos_index, self.pad_index, self.bos_index)
        return " ".join(self[i] for i in ids if i not in skip)

    def save(self, path: str | Path) -> None:
        """fairseq's dict.<lang>.txt format: `symbol count`, specials left out."""
        with open(path, "w", encoding="utf-8") as f:
            for w, c in zip(self.symbols[self.nspecial:], self.count[self.nspecial:]):
                f.write(f"{w} {c}\n")


def read_lines(path: str | Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


class PairDataset:
    """Encoded sentence pairs of one split (each sequence ends with </s>), plus the raw target lines."""

    def __init__(self, src: list[torch.Tensor], tgt: list[torch.Tensor], tgt_lines: list[str] | None = None):
        assert len(src) == len(tgt), f"{len(src)} source vs {len(tgt)} target sentences"
        self.src, self.tgt = src, tgt
        self.src_sizes = np.array([len(s) for s in src], dtype=np.int64)
        self.tgt_sizes = np.array([len(t) for t in tgt], dtype=np.int64)
        self.tgt_lines = tgt_lines

    @classmethod
    def from_lines(cls, src_lines: list[str], tgt_lines: list[str], src_dict: Dictionary,
                   tgt_dict: Dictionary) -> "PairDataset":
        if len(src_lines) != len(tgt_lines):
            raise ValueError(f"{len(src_lines)} source lines vs {len(tgt_lines)} target lines")
        return cls([src_dict.encode_line(s) for s in src_lines], [tgt_dict.encode_line(t) for t in tgt_lines],
                   tgt_lines)

    def __len__(self) -> int:
        return len(self.src)

    def num_tokens(self, i: int) -> int:
        return int(max(self.src_sizes[i], self.tgt_sizes[i]))


def batch_by_size(src_sizes: np.ndarray, tgt_sizes: np.ndarray | None, max_tokens: int) -> list[np.ndarray]:
    """Sort by (source length, target length, index) and cut greedily so that
    sentences x max(max src len, max tgt len) <= max_tokens."""
    tgt_sizes = src_sizes if tgt_sizes is None else tgt_sizes
    order = np.lexsort((np.arange(len(src_sizes)), tgt_sizes, src_sizes))
    sizes = np.maximum(src_sizes, tgt_sizes)
    batches, current, longest = [], [], 0
    for idx in order:
        n = int(sizes[idx])
        new_longest = max(longest, n)
        if current and (len(current) + 1) * new_longest > max_tokens:
            batches.append(np.array(current, dtype=np.int64))
            current, new_longest = [], n
        current.append(int(idx))
        longest = new_longest
    if current:
        batches.append(np.array(current, dtype=np.int64))
    return batches


def pad_right(seqs: Sequence[torch.Tensor], pad: int = PAD) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def collate(dataset: PairDataset, idx: Sequence[int], pad: int = PAD, eos: int = EOS):
    """((src_tokens, src_lengths, prev_output_tokens), target), right-padded."""
    src = [dataset.src[i] for i in idx]
    tgt = [dataset.tgt[i] for i in idx]
    src_tokens = pad_right(src, pad)
    src_lengths = torch.tensor([len(s) for s in src], dtype=torch.long)
    target = pad_right(tgt, pad)
    prev = pad_right([torch.cat([t.new_tensor([eos]), t[:-1]]) for t in tgt], pad)
    return (src_tokens, src_lengths, prev), target


def pin_batch(batch):
    """A collated batch ((src, lengths, prev), target) in page-locked host memory."""
    (src, lengths, prev), target = batch
    return (src.pin_memory(), lengths.pin_memory(), prev.pin_memory()), target.pin_memory()


class TokenBatchLoader:
    """Batches of about `max_tokens` tokens (see the module docstring); `epoch` picks the batch order."""

    def __init__(self, dataset: PairDataset, max_tokens: int, shuffle: bool = True, seed: int = 0,
                 pad: int = PAD, eos: int = EOS, rank: int | None = None, world: int | None = None,
                 pin: bool = False):
        self.dataset = dataset
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.rank = D.rank() if rank is None else rank
        self.world = D.world_size() if world is None else world
        self.epoch = 0
        self.batches = batch_by_size(dataset.src_sizes, dataset.tgt_sizes, max_tokens)
        self._collated = [collate(dataset, b, pad, eos) for b in self.batches]  # fixed batches: collate once
        if pin:  # page-locked: the engine's non_blocking copy to the GPU no longer waits for the GPU to catch up
            self._collated = [pin_batch(b) for b in self._collated]

    def __len__(self) -> int:
        return -(-len(self.batches) // self.world)

    def order(self, epoch: int | None = None) -> list[int]:
        """This rank's batch indices for an epoch (0-based)."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.batches)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        total = len(self) * self.world
        order = (order * (-(-total // max(n, 1))))[:total] if n else []
        return order[self.rank::self.world]

    def __iter__(self):
        order = self.order()
        self.epoch += 1
        for i in order:
            yield self._collated[i]


def load_split(data_dir: str | Path, split: str, src_dict: Dictionary, tgt_dict: Dictionary,
               src: str = "de", tgt: str = "en") -> PairDataset:
    root = Path(data_dir)
    return PairDataset.from_lines(read_lines(root / f"{split}.{src}"), read_lines(root / f"{split}.{tgt}"),
                                  src_dict, tgt_dict)
