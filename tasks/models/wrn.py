"""Wide ResNets of Zagoruyko & Komodakis 2016: pre-activation basic blocks (BN-ReLU-conv), 1x1 conv
shortcuts where the shape changes, widths 16k-32k-64k, depth = 6n + 4."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from tasks.models import register_model


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.dropout > 0:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        assert (depth - 4) % 6 == 0, "depth must be 6n + 4"
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks, in_planes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(WideBlock(in_planes, planes, stride if i == 0 else 1, dropout))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.blocks(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


_SRC = "Zagoruyko & Komodakis 2016, Wide Residual Networks, Table 1 / Sec. 3"


@register_model("wrn28_2", params_m=1.47, source=_SRC)
def wrn28_2(num_classes: int = 10) -> nn.Module:
    return WideResNet(28, 2, num_classes)


@register_model("wrn28_10", params_m=36.5, source=_SRC)
def wrn28_10(num_classes: int = 10) -> nn.Module:
    return WideResNet(28, 10, num_classes)
