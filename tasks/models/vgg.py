"""VGG-19 with BatchNorm in its CIFAR form (Simonyan & Zisserman 2015, configuration E; BN after every
conv): 3x3 convs (with bias) + BN + ReLU, five 2x2 max-pools taking 32x32 down to 1x1, and a single linear
head on the 512-d feature, as in the widely used kuangliu/pytorch-cifar VGG('VGG19'). The ImageNet form's
4096-4096 fully connected classifier (~139M params at 224px) is not used.

Parameter count, CIFAR-10 head: 20,040,522 (~20.04M) -- 20,035,392 in the conv/BN stack + 5,130 in
Linear(512, 10) -- the ~20.0M figure usually quoted for VGG-19(-BN) on CIFAR-10."""
from __future__ import annotations

from torch import nn

from tasks.models.registry import register_model

# Configuration E of Simonyan & Zisserman 2015, Table 1: numbers are conv widths, "M" a 2x2 max-pool.
_CFG_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg: list, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        layers, in_ch = [], in_chans
        for i, v in enumerate(cfg):
            if v == "M" and i == len(cfg) - 1:
                # the last 2x2 pool takes 2x2 to 1x1 at 32x32 inputs; at 28x28 (Fashion-MNIST) the map is
                # already 1x1 there, so pool to 1x1 adaptively: the same result at 32x32, defined at 28x28
                layers.append(nn.AdaptiveMaxPool2d(1))
            elif v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, 1, 1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)   # single head on the 512-d (1x1) feature

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


# Published figure: ~20.0M, kuangliu/pytorch-cifar models/vgg.py VGG('VGG19') (20,040,522 params with
# the 10-way head); that is the single-Linear(512, num_classes) variant built here.
@register_model("vgg19_bn", params_m=20.04,
                source="kuangliu/pytorch-cifar models/vgg.py, VGG('VGG19') (cfg E + BN, Linear(512, C) head)",
                recipe={})
def vgg19_bn(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return VGG(_CFG_E, num_classes, in_chans)
