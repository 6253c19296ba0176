"""A tiny float64 MLP, its data and the engine's batch that logs pass kinds: what the minimizers' reference tests
(tests/minimizers/) share."""
import torch
from torch import nn
from torch.nn import functional as F

from bench.train.batch import Batch


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def data(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


X, Y = data()


def closure_for(net, x=X, y=Y):
    def closure():
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss.detach()
    return closure


def weights(net):
    return [p.detach().clone() for p in net.parameters()]


class LoggedBatch(Batch):
    """The engine's batch, appending each pass's kind to `kinds`."""

    def __init__(self, *args, kinds, **kw):
        super().__init__(*args, **kw)
        self.kinds = kinds

    def __call__(self, kind="plain", **kw):
        self.kinds.append(kind)
        return super().__call__(kind, **kw)


def train_with_frozen_and_unused(name, steps, closure=None, **options):
    """The tiny MLP with its first weight frozen and a parameter no pass uses, `steps` steps of minimizer `name`
    (SGD with momentum, rho 0.3) over the trainable ones; asserts the frozen and unused ones never moved and the
    last layer did. `closure(net, t)` makes step t's closure (default: the fixed batch). Returns the minimizer."""
    from bench.minimizers import create_minimizer
    net = mlp()
    net.register_parameter("unused", nn.Parameter(torch.ones(3, dtype=torch.float64)))
    net[0].weight.requires_grad_(False)
    frozen, unused, before = (t.detach().clone() for t in (net[0].weight, net.unused, net[2].weight))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = create_minimizer(name, torch.optim.SGD(params, lr=0.1, momentum=0.9), net, rho=0.3, **options)
    for t in range(steps):
        opt.step(closure(net, t) if closure else closure_for(net))
    assert torch.equal(net[0].weight, frozen) and torch.equal(net.unused, unused)
    assert not torch.equal(net[2].weight, before)
    return opt
