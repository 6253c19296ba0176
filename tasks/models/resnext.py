"""ResNeXt-29 for CIFAR (Xie et al. 2017, CIFAR form): 3x3 stem conv to 64 channels, three stages of 3
bottleneck blocks each (depth 9 * 3 + 2 = 29), block = conv1x1 -> grouped conv3x3 (cardinality C) ->
conv1x1 expanding 2x, BN after every conv, projection (1x1 conv + BN) shortcuts where the shape changes.
With C = 32 and bottleneck width d = 4 in stage 1 (doubling per stage) the grouped widths are 128/256/512
and the block outputs 256/512/1024, as in kuangliu/pytorch-cifar's ResNeXt29_32x4d.

The paper's CIFAR table (Table 7) only lists the 8x64d (34.4M) and 16x64d (68.1M) models; the 32x4d
figure used here is that of the kuangliu reference implementation: 4,774,218 params (~4.77M) on CIFAR-10.
That implementation uses a 1x1 stem conv; this module keeps the paper's 3x3 stem (its CIFAR nets start
with a single 3x3 conv layer), which adds 3 * 64 * 8 = 1,536 params: 4,775,754 in all (+0.03%)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from tasks.models import register_model


class Block(nn.Module):
    expansion = 2

    def __init__(self, in_planes: int, cardinality: int, bottleneck_width: int, stride: int):
        super().__init__()
        gw = cardinality * bottleneck_width
        self.conv1 = nn.Conv2d(in_planes, gw, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(gw)
        self.conv2 = nn.Conv2d(gw, gw, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(gw)
        self.conv3 = nn.Conv2d(gw, self.expansion * gw, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * gw)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * gw:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * gw, 1, stride, bias=False),
                nn.BatchNorm2d(self.expansion * gw))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNeXt(nn.Module):
    def __init__(self, num_blocks: tuple[int, ...], cardinality: int, bottleneck_width: int,
                 num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)   # paper: 3x3 stem (kuangliu: 1x1)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes, width, stages = 64, bottleneck_width, []
        for i, n in enumerate(num_blocks):
            blocks = []
            for j in range(n):
                blocks.append(Block(in_planes, cardinality, width, 2 if (i > 0 and j == 0) else 1))
                in_planes = Block.expansion * cardinality * width
            stages.append(nn.Sequential(*blocks))
            width *= 2
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# Published figure: 4,774,218 params, kuangliu/pytorch-cifar models/resnext.py ResNeXt29_32x4d()
# (not in Xie et al. 2017 Table 7, which lists only the 8x64d and 16x64d CIFAR models); ours is
# 4,775,754 because of the paper's 3x3 stem (kuangliu: 1x1).
@register_model("resnext29_32x4d", params_m=4.77,
                source="kuangliu/pytorch-cifar models/resnext.py, ResNeXt29_32x4d() "
                       "(Xie et al. 2017 CIFAR form; 32x4d is not in the paper's Table 7)",
                recipe={})
def resnext29_32x4d(num_classes: int = 10) -> nn.Module:
    return ResNeXt((3, 3, 3), cardinality=32, bottleneck_width=4, num_classes=num_classes)
