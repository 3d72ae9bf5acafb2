"""CIFAR-sized (32x32 RGB) victims.

Where a library has the architecture we use it (RobustBench's ResNet-18/WRN, whose state dicts match
the released robust checkpoints; torchvision's MobileNetV2/ShuffleNetV2). ImageNet architectures
downsample 32x in their stem and first stage, which leaves a 1x1 map on 32x32 inputs, so the CIFAR
variants below drop that early downsampling (the usual CIFAR adaptation, e.g. kuangliu/pytorch-cifar).
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models import MobileNetV2, resnet, shufflenet_v2_x1_0

from models.robustbench_compat import import_robustbench


def resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 for CIFAR (3x3 stride-1 stem, no max-pool), RobustBench's definition.

    Using RobustBench's class keeps state-dict keys compatible with its zoo checkpoints
    (e.g. ``Addepalli2022Efficient_RN18``). Its head is ``avg_pool2d(·, 4)``, i.e. 32x32 inputs only.
    """
    arch = import_robustbench("model_zoo.architectures.resnet")
    return arch.ResNet(arch.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


def wide_resnet_28_10(
    num_classes: int = 10, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0
) -> nn.Module:
    """WRN-28-10 (Zagoruyko & Komodakis 2016) as RobustBench defines it (the TRADES code).

    ``depth``/``widen_factor`` are exposed so tests can build a WRN-10-1 in milliseconds; depth must be
    6n+4.
    """
    arch = import_robustbench("model_zoo.architectures.wide_resnet")
    return arch.WideResNet(depth=depth, num_classes=num_classes, widen_factor=widen_factor, dropRate=dropout)


class _ShortcutA(nn.Module):
    """He et al.'s CIFAR shortcut "option A": stride-2 subsampling plus zero-padded channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class CifarResNet(nn.Module):
    """He et al. (2016, §4.2) CIFAR ResNet: depth 6n+2, three stages of n BasicBlocks at 16/32/64 channels.

    Blocks are torchvision's ``BasicBlock``; the shortcut on the two downsampling blocks is option A
    (parameter-free), as in the paper's CIFAR experiments. Global average pool + FC head.
    """

    def __init__(self, depth: int = 56, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        blocks, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                s = stride if i == 0 else 1
                shortcut = _ShortcutA(in_planes, planes, s) if (s != 1 or in_planes != planes) else None
                blocks.append(resnet.BasicBlock(in_planes, planes, stride=s, downsample=shortcut))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def resnet56(num_classes: int = 10) -> nn.Module:
    """ResNet-56 for CIFAR (n = 9 blocks per stage, ~0.85 M parameters)."""
    return CifarResNet(depth=56, num_classes=num_classes)


def mobilenet_v2(num_classes: int = 10) -> nn.Module:
    """torchvision MobileNetV2 adapted to 32x32 inputs (total downsampling 32x → 8x, final map 4x4).

    Changed strides: the stem conv ``features[0][0]`` 2 → 1, and the first stride-2 bottleneck stage
    (t=6, c=24, n=2) 2 → 1. Everything else (widths, expansion, dropout 0.2 head) is torchvision's.
    """
    # t (expansion), c (channels), n (blocks), s (stride of the first block): torchvision's, but s=1 at c=24.
    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    net = MobileNetV2(num_classes=num_classes, inverted_residual_setting=setting)
    net.features[0][0].stride = (1, 1)
    return net


def shufflenet_v2(num_classes: int = 10) -> nn.Module:
    """torchvision ShuffleNetV2 1.0x adapted to 32x32 inputs (total downsampling 32x → 8x, final map 4x4).

    Changed: the stem conv ``conv1[0]`` stride 2 → 1, and the stem max-pool (3x3, stride 2) removed
    (replaced by identity). Stages 2-4 keep their stride-2 first blocks.
    """
    net = shufflenet_v2_x1_0(weights=None, num_classes=num_classes)
    net.conv1[0].stride = (1, 1)
    net.maxpool = nn.Identity()
    return net
