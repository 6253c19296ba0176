"""PyramidNet with bottleneck blocks (Han et al. 2017, Deep Pyramidal Residual Networks) for CIFAR, plain
(`pyramidnet272`) or with ShakeDrop regularisation (Yamada et al. 2018; `pyramidnet272_shakedrop`), the two
PyramidNet rows of the SAM paper's Table 1. Layout of dyhan0920/PyramidNet-PyTorch (the same as the
official SAM code's sam_jax/models/pyramidnet.py): 3x3 stem to 16 channels + BN; 3 stages of
n = (depth - 2) / 9 bottleneck blocks; the block width grows additively by alpha / (3n) per block (rounded);
block = BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(4x)-BN (BN at the end of the residual branch, no ReLU
after the addition); identity shortcuts with zero-padded extra channels and 2x2 average pooling when
downsampling; final BN-ReLU, global average pool and a linear head.

ShakeDrop multiplies each residual branch, in training, by (b + alpha - b * alpha) in the forward pass and
by (b + beta - b * beta) in the backward pass, with per-sample b ~ Bernoulli(1 - p_l), alpha ~ U[-1, 1] and
beta ~ U[0, 1]; in eval mode by its expectation 1 - p_l. Block l of L has p_l = 0.5 * l / L. With
`true_gradient = True` (the official SAM code's first pass) the backward uses the forward's factor, so the
gradient is the true gradient of the sampled network.

Randomness: every random draw (b, alpha and beta) comes from torch's global RNG (torch.bernoulli /
torch.rand on the input's device, i.e. the CPU generator or that CUDA device's generator), and all three
are drawn in the forward pass, in block order (beta is stored for the backward pass, and drawn even when
true_gradient makes it unused, so the draws never depend on the flag), so saving and restoring torch's RNG
state (torch.manual_seed, get_rng_state/set_rng_state, torch.cuda's equivalents) reproduces the masks
exactly, independently of when or whether backward runs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.models.cifar_resnet import init_official
from tasks.models.registry import global_avg_pool, register_model


class ShakeDropFunction(torch.autograd.Function):
    """y = x * (b + alpha - b*alpha); dL/dx = g * (b + beta - b*beta), or g * (b + alpha - b*alpha) with
    true_gradient; b, alpha, beta drawn per sample."""

    @staticmethod
    def forward(ctx, x, p: float, true_gradient: bool = False):
        shape = (x.size(0),) + (1,) * (x.dim() - 1)
        b = torch.bernoulli(torch.full(shape, 1.0 - p, dtype=x.dtype, device=x.device))
        alpha = torch.rand(shape, dtype=x.dtype, device=x.device).mul_(2).sub_(1)   # U[-1, 1]
        beta = torch.rand(shape, dtype=x.dtype, device=x.device)                    # U[0, 1]
        # b + a - b*a written as b + (1 - b) * a: exactly 1 where b = 1 and exactly a where b = 0
        forward_gate = b + (1 - b) * alpha
        ctx.save_for_backward(forward_gate if true_gradient else b + (1 - b) * beta)
        return x * forward_gate

    @staticmethod
    def backward(ctx, grad_output):
        (gate,) = ctx.saved_tensors
        return grad_output * gate, None, None


def shake_drop(x: torch.Tensor, p: float, training: bool = True, true_gradient: bool = False) -> torch.Tensor:
    if training:
        return ShakeDropFunction.apply(x, p, true_gradient)
    return (1.0 - p) * x


class ShakeDrop(nn.Module):
    """ShakeDrop gate of drop probability p. `true_gradient` is a plain attribute the engine sets before
    each SAM pass (True on the first pass, as the official SAM code does)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.true_gradient: bool = False

    def forward(self, x):
        return shake_drop(x, self.p, self.training, self.true_gradient)

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}, true_gradient={self.true_gradient}"


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, p_drop: float | None):
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(out_planes)
        # p_drop None: plain PyramidNet, the residual branch is added as it is
        self.shake_drop = nn.Identity() if p_drop is None else ShakeDrop(p_drop)
        self.stride = stride
        self.pad = out_planes - in_planes

    def shortcut(self, x):
        if self.stride != 1:
            x = F.avg_pool2d(x, 2, self.stride)
        if self.pad > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))   # zero channels appended, as in the reference
        return x

    def forward(self, x):
        out = self.conv1(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        out = self.shake_drop(self.bn4(out))
        return out + self.shortcut(x)


class PyramidNet(nn.Module):
    def __init__(self, depth: int, alpha: float, num_classes: int = 10, p_max: float | None = 0.5,
                 in_chans: int = 3):
        """p_max: drop probability of the last block under ShakeDrop; None builds the plain PyramidNet."""
        super().__init__()
        assert (depth - 2) % 9 == 0, "bottleneck PyramidNet depth must be 9n + 2"
        n = (depth - 2) // 9
        total = 3 * n
        add_rate = alpha / total
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, in_planes, width, l = [], 16, 16.0, 0
        for stage in range(3):
            for i in range(n):
                l += 1
                width += add_rate
                planes = int(round(width))
                stride = 2 if (stage > 0 and i == 0) else 1
                p_drop = None if p_max is None else p_max * l / total
                blocks.append(Bottleneck(in_planes, planes, stride, p_drop))
                in_planes = planes * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.bn_final = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        init_official(self)  # kaiming fan_out convs, BN 1 / 0 (draws nothing else, so the order is kept)
        nn.init.zeros_(self.fc.bias)

    @property
    def drop_probs(self) -> list[float]:
        """Each block's ShakeDrop probability; 0 for every block of the plain PyramidNet."""
        return [getattr(b.shake_drop, "p", 0.0) for b in self.blocks]

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        out = self.blocks(out)
        out = F.relu(self.bn_final(out))
        out = global_avg_pool(out)
        return self.fc(out)


# Published figure: 26.0M params, Han et al. 2017, Table 4 (top-1 error on CIFAR: PyramidNet (bottleneck),
# alpha = 200, depth 272, 26.0M, CIFAR-10); the same network is the base of Yamada et al. 2018's
# "PyramidNet-272 (alpha 200) + ShakeDrop" (ShakeDrop adds no parameters). Our build
# (dyhan0920/PyramidNet-PyTorch layout, rounded widths as the SAM code) has 26,210,842 params (+0.8%).
# recipe: left empty on purpose -- the paper's training recipe for this model (Han et al. 2017 /
# Yamada et al. 2018) is unverified here, so no per-model training differences are recorded.
_SRC = "Han et al. 2017, Deep Pyramidal Residual Networks, Table 4 (bottleneck, alpha=200, depth 272)"


@register_model("pyramidnet272", params_m=26.0, source=_SRC, recipe={}, rev="plain")
def pyramidnet272(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return PyramidNet(272, 200, num_classes, p_max=None, in_chans=in_chans)


@register_model("pyramidnet272_shakedrop", params_m=26.0, source=_SRC + "; ShakeDrop per Yamada et al. 2018",
                recipe={})
def pyramidnet272_shakedrop(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return PyramidNet(272, 200, num_classes, p_max=0.5, in_chans=in_chans)
