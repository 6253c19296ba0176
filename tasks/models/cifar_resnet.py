"""The CIFAR ResNets the official ASAM code trained (`example_cifar.py` imports them from homura-core
2021.3.1, `homura.vision.models.cifar_resnet`), rebuilt here to be the same functions of the same weights:

- one trunk for ResNet / WRN / ResNeXt: 3x3 stem conv, three stages (stride 1, 2, 2), global average
  pooling, a linear head; post-activation nets put BN-ReLU after the stem, pre-activation nets (WRN) put
  one BN-ReLU after the last stage instead;
- ResNet-20/32/56 (this file): post-activation basic blocks whose shortcut, when the shape changes, is a
  1x1 conv + BN projection ("option B"), not He et al.'s parameter-free option A (see resnet_option_a.py);
- initialisation: every Conv2d kaiming-normal (fan_out, relu), every BatchNorm2d weight 1 / bias 0, the
  Linear head keeps PyTorch's default init, no zero-init of any BN.

Parameter and buffer names are homura's (conv1, norm1, layer1.0.downsample.0, fc, ...), so its
checkpoints load as they are. Modules are also built and initialised in homura's order, so that under the
same torch seed the initial weights are bit-identical to homura's (tests/task/test_models_homura.py checks
both against a recorded fixture)."""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import nn

from tasks.models.registry import global_avg_pool, register_model

BlockFn = Callable[[int, int, int], nn.Module]   # (in_planes, planes, stride) -> block with .out_planes


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False, groups=groups)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)


def init_official(model: nn.Module) -> None:
    """homura's init_parameters: the order of modules() fixes the order of the random draws."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        # convs before BNs and the projection last: the order homura builds (and draws) them in
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.conv2 = conv3x3(planes, planes)
        self.norm1 = nn.BatchNorm2d(planes)
        self.norm2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))
        self.out_planes = planes

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class CifarResNet(nn.Module):
    """Stem, three stages of `depth` blocks with `planes` channels each (strides 1, 2, 2), pooling, head."""

    def __init__(self, block: BlockFn, depth: int, planes: tuple[int, int, int], num_classes: int = 10,
                 in_chans: int = 3, stem_width: int = 16, preact: bool = False):
        super().__init__()
        self.preact = preact
        self.conv1 = conv3x3(in_chans, stem_width)
        stages, in_planes = [], stem_width
        for p, stride in zip(planes, (1, 2, 2)):
            blocks = []
            for i in range(depth):
                blocks.append(block(in_planes, p, stride if i == 0 else 1))
                in_planes = blocks[-1].out_planes
            stages.append(nn.Sequential(*blocks))
        # one BN either after the stem (post-activation) or after the last stage (pre-activation)
        self.norm1 = nn.BatchNorm2d(in_planes if preact else stem_width)
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(in_planes, num_classes)
        init_official(self)

    def forward(self, x):
        x = self.conv1(x)
        if not self.preact:
            x = F.relu(self.norm1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        if self.preact:
            x = F.relu(self.norm1(x))
        # adaptive pooling: 8x8 maps at 32x32 inputs, 7x7 at 28x28 (Fashion-MNIST)
        return self.fc(global_avg_pool(x))


def resnet(depth: int, num_classes: int = 10, in_chans: int = 3, width: int = 16) -> CifarResNet:
    """ResNet-(6n+2) with option-B shortcuts; `width` is the stem and first-stage width (16 in the paper)."""
    assert (depth - 2) % 6 == 0, "depth must be 6n + 2"
    return CifarResNet(BasicBlock, (depth - 2) // 6, (width, 2 * width, 4 * width), num_classes, in_chans,
                       stem_width=width)


_SRC = ("homura-core 2021.3.1, homura.vision.models.cifar_resnet.{} (the model the official ASAM "
        "example_cifar.py trains; count measured on the wheel)")


@register_model("resnet20", params_m=0.272474, source=_SRC.format("resnet20"), rev="homura-2021.3.1")
def resnet20(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return resnet(20, num_classes, in_chans)


@register_model("resnet32", params_m=0.466906, source=_SRC.format("resnet32"), rev="homura-2021.3.1")
def resnet32(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return resnet(32, num_classes, in_chans)


@register_model("resnet56", params_m=0.855770, source=_SRC.format("resnet56"), rev="homura-2021.3.1")
def resnet56(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return resnet(56, num_classes, in_chans)
