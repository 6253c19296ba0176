"""DenseNet-121 (Huang et al. 2017, DenseNet-BC: growth rate k = 32, dense blocks of 6-12-24-16 bottleneck
layers BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k), transitions BN-ReLU-conv1x1 with compression 0.5 and 2x2
average pooling) with the CIFAR stem of kuangliu/pytorch-cifar: one 3x3 conv to 2k channels, no 7x7 conv
and no max-pool, so the three transitions take 32x32 to 4x4. Final BN-ReLU, global average pool, linear.

Parameter count, CIFAR-10 head: 6,956,298 (~6.96M), identical to kuangliu's DenseNet121()."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tasks.models.registry import global_avg_pool, register_model


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    def __init__(self, nblocks: tuple[int, ...], growth: int = 32, reduction: float = 0.5,
                 num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        planes = 2 * growth
        self.conv1 = nn.Conv2d(in_chans, planes, 3, 1, 1, bias=False)     # CIFAR stem
        stages = []
        for i, n in enumerate(nblocks):
            layers = []
            for _ in range(n):
                layers.append(Bottleneck(planes, growth))
                planes += growth
            stages.append(nn.Sequential(*layers))
            if i < len(nblocks) - 1:
                out_planes = int(math.floor(planes * reduction))
                stages.append(Transition(planes, out_planes))
                planes = out_planes
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(planes)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        out = self.features(self.conv1(x))
        out = global_avg_pool(F.relu(self.bn(out)))
        return self.fc(out)


# Published figure: 6,956,298 params, kuangliu/pytorch-cifar models/densenet.py DenseNet121() (CIFAR-10).
@register_model("densenet121", params_m=6.96,
                source="kuangliu/pytorch-cifar models/densenet.py, DenseNet121() "
                       "(k=32, 6-12-24-16, CIFAR stem)",
                recipe={})
def densenet121(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return DenseNet((6, 12, 24, 16), growth=32, reduction=0.5, num_classes=num_classes, in_chans=in_chans)
