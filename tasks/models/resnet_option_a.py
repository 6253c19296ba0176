"""CIFAR ResNets as He et al. 2016 describe them (Sec. 4.2), under names of their own (`resnet20_a`, ...):
3x3 stem, three stages of 16-32-64 channels with n basic blocks each (depth = 6n + 2), parameter-free
"option A" shortcuts (stride-2 subsampling + zero-padded channels), global average pooling and a linear
head. The official ASAM code trained homura's option-B variants instead: `resnet20` etc., cifar_resnet.py."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from tasks.models.registry import global_avg_pool, register_model


class BlockA(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes
        self.stride = stride

    def shortcut(self, x):
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetA(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        assert (depth - 2) % 6 == 0, "depth must be 6n + 2"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BlockA(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = global_avg_pool(out)
        return self.fc(out)


_SRC = "He et al. 2016, Deep Residual Learning, Table 6"


@register_model("resnet20_a", params_m=0.27, source=_SRC)
def resnet20_a(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return ResNetA(20, num_classes, in_chans)


@register_model("resnet32_a", params_m=0.46, source=_SRC)
def resnet32_a(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return ResNetA(32, num_classes, in_chans)


@register_model("resnet56_a", params_m=0.85, source=_SRC)
def resnet56_a(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return ResNetA(56, num_classes, in_chans)
