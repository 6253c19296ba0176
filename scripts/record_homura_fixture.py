"""Regenerate tests/fixtures/homura_cifar_resnet.pt from homura-core 2021.3.1's own CIFAR ResNets (the
models the official ASAM code trains), and print how far ours are from them in float32.

    python scripts/record_homura_fixture.py [--homura DIR] [--out PATH]

Without --homura it pip-installs homura-core==2021.3.1 with its declared dependencies (tqdm, tensorboard,
colorlog: importing homura needs them) into a temporary directory. That directory goes at the *end* of
sys.path, so torch, numpy and everything else still come from this environment.

The fixture holds, so that tests/task/test_models_homura.py needs neither homura nor the network:
- `full`: for resnet20/32/56, wrn28_2, wrn28_10, resnext29_32x4d, homura's state_dict names and shapes,
  its parameter count, a fingerprint (float64 sum and sum of squares) of every tensor as built under
  torch.manual_seed(0), and its float64 outputs on `x` (train mode, then eval mode) from those weights;
- `small`: three small models of the same classes (all block kinds, projections at stride 1 and 2, grouped
  convs) with BN weights, biases and running statistics randomised, their state_dict (float32) and float64
  outputs on `x` in eval mode, then train mode;
- `x`: the input (4 x 3 x 32 x 32, float32 values, run in float64), and the versions it was recorded with.
If torch ever changes its CPU random streams, the fingerprints move: regenerate with this script."""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.models import create_model  # noqa: E402

FULL = ["resnet20", "resnet32", "resnet56", "wrn28_2", "wrn28_10", "resnext29_32x4d"]
# name -> homura ResNet(block, 10, **kwargs); the test builds ours under the same name. One model per block
# kind, two blocks per stage, narrow stems to keep the fixture small.
SMALL = {
    "resnet14_w4": dict(block="BasicBlock", layer_depth=2, width=4),
    "wrn16_2_w2": dict(block="PreactBasicBlock", layer_depth=2, width=2, widen_factor=2, preact=True),
    "resnext20_2x32d_w4": dict(block="Bottleneck", layer_depth=2, width=4, groups=2, width_per_group=32),
}
HOMURA = "homura-core==2021.3.1"


def import_homura(path: str | None):
    if path is None:
        path = tempfile.mkdtemp(prefix="homura-")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", path, HOMURA], check=True)
    sys.path.append(path)
    from homura.vision.models import cifar_resnet
    return cifar_resnet


def fingerprint(model: torch.nn.Module) -> torch.Tensor:
    rows = [(t.double().sum().item(), t.double().square().sum().item()) for t in model.state_dict().values()]
    return torch.tensor(rows, dtype=torch.float64)


def outputs(model: torch.nn.Module, x: torch.Tensor, modes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for mode in modes:
            model.train(mode == "train")
            out[mode] = model(x.to(next(model.parameters()).dtype))
    return out


def randomise_bn(model: torch.nn.Module, seed: int) -> None:
    """BN at init is weight 1, bias 0, mean 0, var 1: randomise it so eval mode tests something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.2
            m.running_mean = torch.randn(n, generator=g) * 0.2
            m.running_var = torch.rand(n, generator=g) + 0.5


def record_full(cr, x: torch.Tensor) -> dict:
    full = {}
    for name in FULL:
        torch.manual_seed(0)
        model = getattr(cr, name)()
        sd = model.state_dict()
        full[name] = {"keys": list(sd), "shapes": [tuple(t.shape) for t in sd.values()],
                      "params": sum(p.numel() for p in model.parameters()), "fingerprint": fingerprint(model),
                      **outputs(model.double(), x, ("train", "eval"))}
    return full


def record_small(cr, x: torch.Tensor) -> dict:
    small = {}
    for i, (name, kw) in enumerate(SMALL.items()):
        kw = dict(kw)
        block = getattr(cr, kw.pop("block"))
        torch.manual_seed(0)
        model = cr.ResNet(block, 10, **kw)
        randomise_bn(model, seed=100 + i)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        small[name] = {"homura_kwargs": SMALL[name], "state_dict": sd,
                       **outputs(model.double(), x, ("eval", "train"))}
    return small


def compare_float32(cr, x: torch.Tensor) -> None:
    """homura's weights (BN randomised) loaded into ours, float32: max |output difference| per mode."""
    x = x.float()
    for name in FULL:
        torch.manual_seed(0)
        theirs = getattr(cr, name)()
        randomise_bn(theirs, seed=7)
        ours = create_model(name)
        ours.load_state_dict(theirs.state_dict())
        diffs = []
        for mode in ("eval", "train"):
            a, b = outputs(theirs, x, (mode,))[mode], outputs(ours, x, (mode,))[mode]
            diffs.append(f"{mode} {(a - b).abs().max().item():.3g} (|y| max {a.abs().max().item():.3g})")
        print(f"{name:16s} float32 max |ours - homura|: " + ", ".join(diffs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--homura", help="a directory where homura-core 2021.3.1 is installed (pip --target)")
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "homura_cifar_resnet.pt"))
    args = ap.parse_args()
    cr = import_homura(args.homura)
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32).double()     # float32 values, so the stored copy can be float32
    fixture = {"homura": HOMURA, "torch": str(torch.__version__), "x": x.float(),
               "full": record_full(cr, x), "small": record_small(cr, x)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} kB)")
    compare_float32(cr, x)


if __name__ == "__main__":
    main()
