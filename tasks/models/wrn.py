"""Wide ResNets (Zagoruyko & Komodakis 2016) as the official ASAM code trained them: homura-core 2021.3.1's
`wrn28_2` / `wrn28_10` (homura.vision.models.cifar_resnet), on the trunk of cifar_resnet.py.

Pre-activation basic blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3, no dropout unless asked: below); where the shape
changes the shortcut is a bare 1x1 conv (no BN) of the block's *raw* input x, not of the pre-activated one; the
stem conv has no BN after it, the last stage is followed by one BN + ReLU before pooling. Widths 16k-32k-64k
after a 16-channel stem, depth = 6n + 4.

`dropout=p` > 0 (RunConfig.dropout) adds the original WRN's dropout (Zagoruyko & Komodakis 2016, Sec. 2.3;
their code's `F.dropout` in the block): BN-ReLU-conv3x3-BN-ReLU-*dropout*-conv3x3, in every block. At p = 0
no dropout module is built: the network is homura's, module for module (dropout holds no parameters, so the
parameter and buffer names are the same at every p; building it draws nothing from torch's random stream)."""
from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import nn

from tasks.models.cifar_resnet import CifarResNet, conv1x1, conv3x3
from tasks.models.registry import register_model


class PreactBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.conv2 = conv3x3(planes, planes)
        self.norm1 = nn.BatchNorm2d(in_planes)
        self.norm2 = nn.BatchNorm2d(planes)
        # the original WRN's dropout between the convs; none at all at p = 0 (homura's block, module for module)
        self.dropout: nn.Module | None = nn.Dropout(dropout) if dropout > 0 else None
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            # Drawn and dropped on purpose: homura first builds a post-activation projection conv and
            # then replaces it, so building one here too keeps torch's random stream -- hence the
            # initial weights under a given seed -- identical to homura's.
            conv1x1(in_planes, planes, stride)
            self.downsample = conv1x1(in_planes, planes, stride)
        self.out_planes = planes

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        out = F.relu(self.norm2(out))
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.conv2(out)
        return out + self.downsample(x)     # the projection sees x itself, not relu(norm1(x))


def wide_resnet(depth: int, widen: int, num_classes: int = 10, in_chans: int = 3,
                width: int = 16, dropout: float = 0.0) -> CifarResNet:
    """WRN-depth-widen; `width` is the stem width (16 in the paper), stages are widen * (1, 2, 4) * width;
    `dropout` the rate of the dropout between each block's convs (0: none, homura's network)."""
    assert (depth - 4) % 6 == 0, "depth must be 6n + 4"
    assert 0 <= dropout < 1, f"dropout must be in [0, 1), got {dropout}"
    planes = (widen * width, 2 * widen * width, 4 * widen * width)
    block = partial(PreactBlock, dropout=dropout) if dropout > 0 else PreactBlock
    return CifarResNet(block, (depth - 4) // 6, planes, num_classes, in_chans, stem_width=width,
                       preact=True)


_SRC = ("homura-core 2021.3.1, homura.vision.models.cifar_resnet.{} (the model the official ASAM "
        "example_cifar.py trains; count measured on the wheel; Zagoruyko & Komodakis 2016 give 36.5M for "
        "WRN-28-10)")


@register_model("wrn28_2", dropout=True,
                params_m=1.467610, source=_SRC.format("wrn28_2"), rev="homura-2021.3.1")
def wrn28_2(num_classes: int = 10, in_chans: int = 3, dropout: float = 0.0) -> nn.Module:
    return wide_resnet(28, 2, num_classes, in_chans, dropout=dropout)


@register_model("wrn28_10", dropout=True,
                params_m=36.479194, source=_SRC.format("wrn28_10"), rev="homura-2021.3.1")
def wrn28_10(num_classes: int = 10, in_chans: int = 3, dropout: float = 0.0) -> nn.Module:
    return wide_resnet(28, 10, num_classes, in_chans, dropout=dropout)
