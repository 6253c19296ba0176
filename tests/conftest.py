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
