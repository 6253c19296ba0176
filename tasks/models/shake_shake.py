"""Shake-Shake 26 2x96d (Gastaldi 2017, Shake-Shake regularization), the CIFAR "Shake-Shake-Image" variant
(one random coefficient per image, new ones in the backward pass), as the official SAM code builds it
(sam_jax/models/wide_resnet_shakeshake.py, "WideResnet28x6_ShakeShake", which follows Gastaldi and the
TensorFlow AutoAugment shake_shake.py):

- stem: 3x3 conv to 16 channels + BN (no ReLU: each branch starts with one);
- three stages of 4 blocks, 16k / 32k / 64k channels (k = 6: 96 / 192 / 384), strides 1, 2, 2;
  depth 26 = 3 stages * 4 blocks * 2 convs + stem + head;
- block: two branches ReLU-conv3x3(stride)-BN-ReLU-conv3x3-BN mixed as alpha * a + (1 - alpha) * b, plus
  the shortcut; where the width changes the shortcut is Gastaldi's: 1x1 average pooling with the stride on
  x and on x shifted by one pixel, a 1x1 conv to half the width on each, concatenated, then BN;
- head: ReLU, global average pooling, linear.

Shake-Shake-Image, in training: per image alpha ~ U[0, 1] mixes the forward pass and an independent
beta ~ U[0, 1] the backward one (d/da = beta * g, d/db = (1 - beta) * g); `true_gradient = True` uses
alpha in the backward too (the official SAM code's first pass). Eval: 0.5 * (a + b). Both coefficients
come from torch's global RNG in the forward pass, whatever the flag, so an RNG state fixes them.

Initialisation as the SAM code: convs kaiming-normal fan_out (gain sqrt 2), BN weight 1 / bias 0, the
linear layer's weight U[-1/sqrt(num_classes), 1/sqrt(num_classes)] and bias 0."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tasks.models.cifar_resnet import init_official
from tasks.models.registry import global_avg_pool, register_model


class ShakeShakeFunction(torch.autograd.Function):
    """y = alpha * a + (1 - alpha) * b; gradients beta * g and (1 - beta) * g (alpha with true_gradient)."""

    @staticmethod
    def forward(ctx, a, b, true_gradient: bool = False):
        shape = (a.size(0),) + (1,) * (a.dim() - 1)
        alpha = torch.rand(shape, dtype=a.dtype, device=a.device)
        beta = torch.rand(shape, dtype=a.dtype, device=a.device)   # drawn even if unused: see module doc
        ctx.save_for_backward(alpha if true_gradient else beta)
        return alpha * a + (1 - alpha) * b

    @staticmethod
    def backward(ctx, grad_output):
        (gate,) = ctx.saved_tensors
        return grad_output * gate, grad_output * (1 - gate), None


class ShakeShake(nn.Module):
    """Mixes the two branches. `true_gradient` is a plain attribute the engine sets before each SAM pass."""

    def __init__(self):
        super().__init__()
        self.true_gradient: bool = False

    def forward(self, a, b):
        if self.training:
            return ShakeShakeFunction.apply(a, b, self.true_gradient)
        return 0.5 * (a + b)

    def extra_repr(self) -> str:
        return f"true_gradient={self.true_gradient}"


def _branch(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes),
                         nn.ReLU(), nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes))


class ShiftedProjection(nn.Module):
    """Gastaldi's shortcut where the width changes: half the channels from x, half from x shifted by one
    pixel (so the stride-2 subsampling of the two halves sees different pixels)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, planes // 2, 1, bias=False)
        self.conv2 = nn.Conv2d(in_planes, planes - planes // 2, 1, bias=False)
        self.norm = nn.BatchNorm2d(planes)

    def forward(self, x):
        s = self.stride
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))    # pixel (i, j) <- (i + 1, j + 1), zeros at the edge
        h1 = self.conv1(x[:, :, ::s, ::s])                 # a 1x1 average pool with stride s is subsampling
        h2 = self.conv2(shifted[:, :, ::s, ::s])
        return self.norm(torch.cat([h1, h2], 1))


class ShakeBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.branch_a = _branch(in_planes, planes, stride)
        self.branch_b = _branch(in_planes, planes, stride)
        self.shake = ShakeShake()
        self.shortcut = nn.Identity() if in_planes == planes else ShiftedProjection(in_planes, planes, stride)

    def forward(self, x):
        return self.shortcut(x) + self.shake(self.branch_a(x), self.branch_b(x))


class ShakeShakeNet(nn.Module):
    def __init__(self, blocks_per_stage: int = 4, widen: int = 6, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(16)
        blocks, in_planes = [], 16
        for planes, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
            for i in range(blocks_per_stage):
                blocks.append(ShakeBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_planes, num_classes)
        self._init()

    def _init(self):
        init_official(self)
        bound = 1 / math.sqrt(self.fc.out_features)     # the SAM / AutoAugment code's dense init
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        x = self.blocks(self.norm1(self.conv1(x)))
        x = global_avg_pool(F.relu(x))
        return self.fc(x)


# Published figure: 26.2M params, Gastaldi 2017, Table 1 (CIFAR-10, "26 2x96d", Shake-Shake-Image).
@register_model("shake_shake26_2x96d", params_m=26.2,
                source="Gastaldi 2017, Shake-Shake regularization, Table 1 (26 2x96d); layout of the official "
                       "SAM code's WideResnet28x6_ShakeShake",
                recipe={})
def shake_shake26_2x96d(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return ShakeShakeNet(4, 6, num_classes, in_chans)
