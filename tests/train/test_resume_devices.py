"""A checkpoint resumes where another number of GPUs is visible: each run saves and restores the CUDA generator of
its own device only (bench.checkpoint), never every visible GPU's by position.

No GPU here: torch.cuda's generator functions are replaced by a fake with a given number of visible devices,
which raises IndexError for a device that does not exist, as torch does."""
import pytest
import torch

from bench.train import checkpoint as ckpt
from bench.train.state import flush, resume, save, setup
from bench.minimizers import SAM, Switches
from bench.recipes import make_config
from bench.registry import get_task


class FakeCuda:
    """`visible` GPUs, each with its own generator state (a byte tensor naming the device)."""

    def __init__(self, visible: int):
        self.visible, self.restored = visible, {}

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.get(i) for i in range(self.visible)])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [self.set(s, i) for i, s in enumerate(states)])

    def _index(self, device):
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= self.visible:
            raise IndexError(f"device {index} of {self.visible}")  # what torch raises for a device it lacks
        return index

    def get(self, device="cuda"):
        return torch.tensor([self._index(device)] * 4, dtype=torch.uint8)

    def set(self, state, device="cuda"):
        self.restored[self._index(device)] = int(state[0])


def _state(tmp_path):
    cfg = make_config("digits-noise", minimizer="sam", epochs=2, device="cpu", workers=0,
                      results_dir=str(tmp_path))
    job = get_task(cfg.task).build(cfg, torch.device("cpu"))
    return setup(cfg, job, torch.device("cpu"))


def test_a_run_saves_its_own_devices_generator_only(monkeypatch):
    fake = FakeCuda(visible=8)
    fake.install(monkeypatch)
    state = ckpt.rng_state(torch.device("cuda", 3))
    assert torch.equal(state["cuda"], torch.tensor([3] * 4, dtype=torch.uint8))  # device 3's, not a list of 8
    assert ckpt.rng_state(torch.device("cpu"))["cuda"] is None


def test_a_checkpoint_from_an_8_gpu_node_resumes_on_a_worker_that_sees_one(monkeypatch, tmp_path):
    """A format-2 checkpoint written before the fix holds the states of the 8 GPUs its node showed; a `--launcher
    local` worker with one GPU visible takes the run over: it resumes, restoring its own device's stream."""
    st = _state(tmp_path)
    path = tmp_path / "checkpoint.pt"
    save(st, path)
    flush(st)
    saved = torch.load(path, weights_only=True)
    saved["rng"][0]["cuda"] = [torch.tensor([i] * 4, dtype=torch.uint8) for i in range(8)]
    torch.save(saved, path)
    fake = FakeCuda(visible=1)
    fake.install(monkeypatch)
    resumed = _state(tmp_path)
    resumed.device = torch.device("cuda", 0)  # the run's device (its tensors stay on the CPU here)
    resume(resumed, path)
    assert fake.restored == {0: 0} and resumed.epoch == 0


def test_a_torchrun_rank_restores_its_own_stream_from_a_new_checkpoint(monkeypatch, tmp_path):
    """Written by the fix: one state per rank, restored onto the rank's device whatever number of GPUs shows."""
    fake = FakeCuda(visible=8)
    fake.install(monkeypatch)
    mine = ckpt.rng_state(torch.device("cuda", 5))
    fake.visible = 6
    ckpt.set_rng_state(mine, torch.device("cuda", 2))
    assert fake.restored == {2: 5}


def test_sam_second_pass_rng_reuse_touches_its_models_device_only(monkeypatch):
    """--second-pass-rng reuse rewinds the generator the model draws from: on a CPU model, no CUDA call at all
    (before: every visible GPU's state, by position)."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state was taken"))
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    opt = SAM(torch.optim.SGD(net.parameters(), lr=0.1), net, rho=0.05, switches=Switches(second_pass_rng="reuse"))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    opt.step(lambda: torch.nn.functional.cross_entropy(net(x), y).backward())
