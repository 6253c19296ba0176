"""ImageNet (ASAM Table 4): the standard folder layout through torchvision, any timm model.

`<data-dir>/train/<wnid>/*.JPEG` and `<data-dir>/val/<wnid>/*.JPEG` (validation images sorted into class
folders, as torchvision's ImageFolder and most ImageNet recipes expect). Training: random-resized crop 224 +
horizontal flip; evaluation: resize 256, center crop 224. Metrics: top-1 and top-5 accuracy.
`bench data fake imagenet DIR --classes 4 --per-class 8` writes a tiny tree of real JPEG files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.config import load_toml
from bench.data import make_loader
from bench.errors import UserError
from bench.registry import register_task
from bench.task import SYNTHETIC_MARKER, DataStatus, Job, Task, cross_entropy_per_example
from tasks.images import make_loss

RECIPE = load_toml(Path(__file__).with_name("imagenet.toml"))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LAYOUT = "<data-dir>/train/<wnid>/*.JPEG and <data-dir>/val/<wnid>/*.JPEG"


def load_image(path: str):
    """torchvision's PIL loader, with a broken file reported as one line that names it."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"broken image {path} ({type(e).__name__}: {' '.join(str(e).split())}); "
                        "replace or remove it") from None


def load_split(root: Path, split: str, transform):
    """torchvision's ImageFolder of one split (torchvision imported when needed: tasks/images.py says why)."""
    from torchvision import datasets
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"ImageNet {split} folder not found at {folder}; expected {LAYOUT} "
                        "(pass --data-dir, or `bench data fake imagenet DIR` for synthetic data)")
    try:
        return datasets.ImageFolder(str(folder), transform=transform, loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"malformed ImageNet {split} folder {folder} ({' '.join(str(e).split())}); "
                        f"expected {LAYOUT}") from None


@register_task("imagenet", description="ImageNet, ASAM Table 4 (folder layout, timm models; top-1/top-5)")
class ImageNetTask(Task):
    base_optimizer = "sgd"
    loader_kinds = ("auto", "torchvision")  # JPEG files decoded by DataLoader workers: no device-resident loader

    def recipe(self, model: str | None = None) -> dict[str, Any]:
        return {**RECIPE, "models": [RECIPE["model"], "(any timm model name)"]}

    def has_model(self, name: str) -> bool:
        import timm
        return timm.is_model(name)

    def build(self, cfg, device: torch.device) -> Job:
        import timm
        from torchvision import transforms
        root = Path(cfg.data_dir)
        train_tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        test_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                      transforms.Normalize(MEAN, STD)])
        train_set, val_set = load_split(root, "train", train_tf), load_split(root, "val", test_tf)
        if train_set.classes != val_set.classes:
            raise UserError(f"ImageNet train and val class folders differ under {root} "
                            f"({len(train_set.classes)} vs {len(val_set.classes)}); expected {LAYOUT}")
        train = make_loader(train_set, cfg.per_replica_batch, train=True, seed=cfg.seed, workers=cfg.workers,
                            device=device)
        val = make_loader(val_set, cfg.per_replica_batch, train=False, seed=cfg.seed, workers=cfg.workers, device=device)
        # NCHW unless --channels-last (the engine converts the model then, and the row says so)
        model: nn.Module = timm.create_model(cfg.model, pretrained=False, num_classes=len(train_set.classes))
        return Job(model=model, train_loader=train, test_loader=val, loss_fn=make_loss(cfg.label_smoothing),
                   num_train=len(train_set), topk=(1, 5) if len(train_set.classes) >= 5 else (1,),
                   loss_per_sample=cross_entropy_per_example(cfg.label_smoothing),  # make_loss, per example
                   track=("test_acc", "test_top5"), synthetic=(root / SYNTHETIC_MARKER).exists(),
                   info={"train_size": len(train_set), "test_size": len(val_set),
                         "num_classes": len(train_set.classes)})

    def data_status(self, data_dir: str | Path) -> DataStatus:
        root = Path(data_dir)
        splits = [root / s for s in ("train", "val")]
        found = all(s.is_dir() and any(c.is_dir() for c in s.iterdir()) for s in splits)
        return DataStatus(root if found else None, LAYOUT.replace("<data-dir>", str(root)),
                          "the ILSVRC-2012 archives, extracted into that layout (docs/datasets.md)")

    def make_fake(self, out_dir: str, classes: int = 4, per_class: int = 8, seed: int = 0, **_: Any) -> str:
        n = write_fake_imagenet(out_dir, classes, per_class, seed)
        return f"wrote synthetic ImageNet ({classes} classes, {n} JPEG files) to {out_dir}"


def write_fake_imagenet(out_dir: str | Path, classes: int, per_class: int, seed: int = 0) -> int:
    """Real JPEG files in the ImageNet layout: each class a colour/stripe pattern plus noise."""
    from PIL import Image
    if classes < 1 or per_class < 1:
        raise UserError("--classes and --per-class must be >= 1")
    rng = np.random.default_rng(seed)
    root = Path(out_dir)
    written = 0
    for c in range(classes):
        wnid = f"n{c:08d}"
        colour = rng.uniform(0, 255, size=3)
        period = 4 + 3 * c
        for split, count in (("train", per_class), ("val", max(1, per_class // 2))):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.integers(48, 97, size=2)
                stripes = (np.arange(w) // period % 2)[None, :, None] * 60.0
                img = colour[None, None, :] + stripes + rng.normal(0, 25, size=(h, w, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{wnid}_{i}.JPEG",
                                                                            quality=90)
                written += 1
    (root / SYNTHETIC_MARKER).write_text(f"synthetic data written by sambench (seed {seed})\n")
    return written
