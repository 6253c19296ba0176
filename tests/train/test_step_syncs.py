"""No host sync and no host-to-device copy in a training step of any minimizer, with --accumulate 2 and --m.

There is no GPU in CI; PyTorch's `meta` device stands in for one. Its tensors have shapes and no data, so every
read of a device value on the host (`.item()`, `bool()`, `.tolist()`, printing) raises there, which is where
CUDA would sync; `DeviceCopies` flags every copy of a host tensor onto the device and every op that mixes host
and device tensors (CUDA copies the host one over), which is where the step would wait for a pageable copy.
A 0-dim host tensor in an op (a scalar, passed by value) is no copy. The step is the engine's own
(`bench.train.step.loop_step` on a `bench.setup` state): the Batch, accumulation, m-sharpness chunks, the epoch
sums, the per-step scheduler."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.train.runtime import autocast_for
from bench.train.state import setup
from bench.minimizers import MINIMIZERS
from bench.recipes import make_config
from bench.train.step import loop_step
from bench.task import Job
from tasks.images import make_loss

META = torch.device("meta")
BATCH = 16


class DeviceCopies(TorchDispatchMode):
    """Raises on a host tensor copied to the device, or mixed into a device op (0-dim scalars excepted)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        to_device = func.__name__.startswith(("_to_copy", "copy_")) and (kwargs or {}).get("device") == META
        if host and (to_device or any(t.device == META for t in tensors)):
            raise AssertionError(f"host-to-device copy: {func} on host tensors of shapes "
                                 f"{[tuple(t.shape) for t in host]}")
        return func(*args, **(kwargs or {}))


def _state(minimizer: str, **settings):
    cfg = make_config("cifar10", model="resnet20", minimizer=minimizer, batch_size=BATCH, epochs=2, device="cpu",
                      workers=0, schedule="cosine-step", **settings)  # a per-step scheduler: it runs in the step
    with torch.device(META):  # a small conv net with BatchNorm (SAM-ON perturbs its parameters): meta ops are slow
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    job = Job(model=model, train_loader=[None] * 4, test_loader=[], loss_fn=make_loss(cfg.label_smoothing),
              num_train=4 * BATCH)
    return setup(cfg, job, META)


CASES = [(name, {"accumulate": 2}) for name in ["sgd", *MINIMIZERS]]
CASES += [(name, {"accumulate": 2, "m": 4}) for name, cls in MINIMIZERS.items() if cls.supports_chunks]


@pytest.mark.parametrize("name,settings", CASES, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in s.items())}"
                                                      for n, s in CASES])
def test_a_training_step_neither_syncs_nor_copies(name, settings):
    st = _state(name, **settings)
    x, y = torch.randn(BATCH, 3, 8, 8, device=META), torch.randint(0, 10, (BATCH,), device=META)
    sums = torch.zeros(5, device=META, dtype=torch.float64)
    with DeviceCopies():
        for _ in range(3):  # LookSAM's reuse steps and ESAM's selection come after the first
            loop_step(st, x, y, autocast_for("fp32", META), sums, lambda t: t.shape[0])
    assert st.cost.steps == 3


def test_the_guard_catches_a_copy_and_a_sync():
    """The guard is live: an index tensor built on the host, and a host read, both fail."""
    x = torch.randn(8, 4, device=META)
    with pytest.raises(AssertionError, match="host-to-device"), DeviceCopies():
        x[torch.arange(4)]
    with pytest.raises((NotImplementedError, RuntimeError)), DeviceCopies():
        x.sum().item()
