import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fake_cifar10(tmp_path_factory):
    from tasks.cifar import write_fake_cifar
    root = tmp_path_factory.mktemp("cifar10")
    write_fake_cifar(root, "cifar10", 200, 100, seed=0)
    return root
