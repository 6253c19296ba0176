"""A synthetic IWSLT corpus in the prepared format, and random source sentences: shared by the translation, its
sync and the perf-loop tests."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from tasks.iwslt14 import SRC, SYNTHETIC_MARKER, TGT
from tasks.translation.data import EOS


def synthetic_lexicon(n_words: int = 24) -> list[tuple[str, str]]:
    """(German-like source word, English-like target word); some target words are 2 BPE pieces."""
    pairs = []
    for i in range(n_words):
        src = f"wort{i}"
        tgt = f"wo@@ rd{i}" if i % 6 == 5 else f"word{i}"
        pairs.append((src, tgt))
    return pairs


def synthetic_pairs(n: int, seed: int, lexicon: list[tuple[str, str]], min_len: int = 3,
                    max_len: int = 8) -> list[tuple[str, str]]:
    """Sentences of lexicon words; the target is the word-for-word translation (a deterministic function)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.randrange(len(lexicon)) for _ in range(rng.randint(min_len, max_len))]
        out.append((" ".join(lexicon[w][0] for w in words) + " .", " ".join(lexicon[w][1] for w in words) + " ."))
    return out


def write_synthetic_corpus(out_dir: str | Path, n_train: int = 400, n_valid: int = 50, n_test: int = 50,
                           seed: int = 0, n_words: int = 24) -> Path:
    """A prepared-format corpus (train/valid/test .de/.en, code, counts.json, SYNTHETIC) whose target is a
    word-for-word translation of the source: learnable in seconds by the tiny Transformer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lexicon = synthetic_lexicon(n_words)
    counts = {}
    for k, (split, n) in enumerate((("train", n_train), ("valid", n_valid), ("test", n_test))):
        pairs = synthetic_pairs(n, seed * 1000 + k, lexicon)
        (out / f"{split}.{SRC}").write_text("".join(p[0] + "\n" for p in pairs), encoding="utf-8")
        (out / f"{split}.{TGT}").write_text("".join(p[1] + "\n" for p in pairs), encoding="utf-8")
        counts[split] = n
    (out / "code").write_text("#version: 0.2\nw o\n", encoding="utf-8")
    (out / "counts.json").write_text(json.dumps(counts, indent=1) + "\n", encoding="utf-8")
    (out / SYNTHETIC_MARKER).write_text(f"synthetic data written by sambench (seed {seed})\n", encoding="utf-8")
    return out


def random_sources(n, vocab, seed=0, min_len=2, max_len=9):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append(torch.cat([torch.randint(4, vocab, (length,), generator=g), torch.tensor([EOS])]))
    return out
