import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fake_cifar10(tmp_path_factory):
    from tasks.cifar import write_fake_cifar
    root = tmp_path_factory.mktemp("cifar10")
    write_fake_cifar(root, "cifar10", 200, 100, seed=0)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one torch thread (files of tiny tensors ask for it), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def old_driver(monkeypatch):
    """A node whose driver (525) is too old for this CUDA 13 wheel: torch sees no GPU and warns why."""
    def unavailable():
        import warnings
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 12000)")
        return False
    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    from bench import gpu
    monkeypatch.setattr(gpu, "driver_version", lambda: "525.105.17")
