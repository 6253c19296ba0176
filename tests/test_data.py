"""bench/data.py: per-example seeding of augmentation (SeededItems)."""
import hashlib

import torch
from torchvision import transforms as T

from bench.data import SeededItems


class Augmented:
    """Ten tiny images through torchvision's CIFAR-style augmentation, plus raw draws from torch's RNG."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        img = torch.arange(3 * 6 * 6, dtype=torch.float32).reshape(3, 6, 6) + i
        aug = T.Compose([T.RandomCrop(6, padding=2), T.RandomHorizontalFlip()])(img)
        return aug, torch.rand(3), torch.randint(0, 1000, (2,))


# What SeededItems(seed=7) gave when it seeded with torch.manual_seed (before it seeded the CPU generator
# alone): the change must not alter a single augmented example, or old runs would no longer be reproduced.
RECORDED = {
    (0, 0): ("87ddbe1e06ea8fcd", [0.13623780012130737, 0.2344355583190918, 0.05913996696472168], [512, 847]),
    (0, 7): ("d4b44d522c3f8cea", [0.8044046759605408, 0.8477571606636047, 0.2432127594947815], [412, 654]),
    (3, 2): ("935c3bd4fa9a17c4", [0.24921172857284546, 0.9893165826797485, 0.8599063158035278], [396, 49]),
}


def test_augmentation_is_unchanged_and_leaves_the_callers_rng_alone():
    ds = SeededItems(Augmented(), seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for key, (digest, rand, ints) in RECORDED.items():
        aug, r, k = ds[key]
        assert (hashlib.sha256(aug.numpy().tobytes()).hexdigest()[:16], r.tolist(), k.tolist()) == (digest, rand, ints)
    assert torch.equal(torch.get_rng_state(), before)


def test_loading_an_item_does_not_reseed_cuda(monkeypatch):
    # torch.manual_seed also (lazily) seeds every CUDA generator: a data loader running in the training
    # process would reset the CUDA stream dropout draws from, once per example.
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("one", seed)))
    ds = SeededItems(Augmented(), seed=7)
    ds[(0, 0)]
    ds[(1, 3)]
    assert calls == []
