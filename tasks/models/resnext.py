"""ResNeXt-29 32x4d (Xie et al. 2017, CIFAR form) as the official ASAM code trained it: homura-core
2021.3.1's `resnext29_32x4d` (homura.vision.models.cifar_resnet), on the trunk of cifar_resnet.py.

64-channel 3x3 stem + BN-ReLU; three stages of 3 post-activation bottlenecks (depth 9 * 3 + 2 = 29):
conv1x1 -> grouped conv3x3 (32 groups, stride here) -> conv1x1 to 4 * planes, BN after each, ReLU after
the first two and after the addition; projection shortcut (1x1 conv + BN) where the shape changes.
Stage planes 64/128/256, bottleneck width int(planes * 4 / 64) * 32 = 128/256/512, outputs 256/512/1024.
4,775,754 parameters with 10 classes."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from tasks.models.cifar_resnet import CifarResNet, conv1x1, conv3x3
from tasks.models.registry import register_model


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, groups: int, width_per_group: int):
        super().__init__()
        width = int(planes * width_per_group / 64) * groups
        out_planes = planes * self.expansion
        self.conv1 = conv1x1(in_planes, width)
        self.conv2 = conv3x3(width, width, stride, groups=groups)
        self.conv3 = conv1x1(width, out_planes)
        self.norm1 = nn.BatchNorm2d(width)
        self.norm2 = nn.BatchNorm2d(width)
        self.norm3 = nn.BatchNorm2d(out_planes)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
        self.out_planes = out_planes

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = F.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return F.relu(out + self.downsample(x))


def resnext(depth: int, groups: int, width_per_group: int, num_classes: int = 10, in_chans: int = 3,
            width: int = 64) -> CifarResNet:
    """ResNeXt-depth (groups)x(width_per_group)d; `width` is the stem width and first-stage planes."""
    assert (depth - 2) % 9 == 0, "depth must be 9n + 2"

    def block(in_planes: int, planes: int, stride: int) -> Bottleneck:
        return Bottleneck(in_planes, planes, stride, groups, width_per_group)

    return CifarResNet(block, (depth - 2) // 9, (width, 2 * width, 4 * width), num_classes, in_chans,
                       stem_width=width)


# The count is homura's, measured; Xie et al. 2017 Table 7 lists only the 8x64d and 16x64d CIFAR models.
# kuangliu/pytorch-cifar's ResNeXt29_32x4d is the same network with a 1x1 stem: 4,774,218.
@register_model("resnext29_32x4d", params_m=4.775754,
                source="homura-core 2021.3.1, homura.vision.models.cifar_resnet.resnext29_32x4d (the model "
                       "the official ASAM example_cifar.py trains; count measured on the wheel)", rev="homura-2021.3.1")
def resnext29_32x4d(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return resnext(29, 32, 4, num_classes, in_chans)
