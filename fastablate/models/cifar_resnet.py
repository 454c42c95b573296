"""The CIFAR ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition",
Sec. 4.2) and their plain twins.

depth = 6n + 2: a 3x3 stem conv with 16 channels, three stages of n blocks with 16, 32,
64 channels (stride 2 at the first block of stages 2 and 3), global average pool, linear.
Shortcuts are option A: identity, or subsampling plus zero-padding of the new channels
where the shape changes, so every block has a parameter-free shortcut. The plain twin
has the same layers without shortcuts.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fastablate.models.registry import register_model
from fastablate.units import (
    BlockParts,
    ModelParts,
    register_adapter,
    register_model_adapter,
)


def _conv3x3(cin: int, cout: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option-A shortcut: take every stride-th pixel and zero-pad the new channels."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.cout - self.cin
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self) -> str:
        return f"{self.cin}->{self.cout}, stride={self.stride}"


class CifarBasicBlock(nn.Module):
    """relu(shortcut(x) + bn2(conv2(relu(bn1(conv1(x))))))."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = PadShortcut(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def residual(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.shortcut(x) + self.residual(x))


class CifarPlainBlock(CifarBasicBlock):
    """The same two conv layers without the shortcut: relu(bn2(conv2(relu(bn1(conv1(x))))))."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(cin, cout, stride)
        del self.shortcut

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.residual(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``plain=True`` gives the twin without shortcuts."""

    def __init__(self, depth: int, num_classes: int = 10, plain: bool = False, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        block = CifarPlainBlock if plain else CifarBasicBlock
        self.conv1 = _conv3x3(in_channels, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def head(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))


DEPTHS = (8, 14, 20, 32, 44, 56, 110)
for _d in DEPTHS:
    register_model(f"resnet{_d}", "cifar-resnet", lambda c, s, d=_d: CifarResNet(d, c),
                   f"CIFAR ResNet-{_d} (He et al. 2016), option-A shortcuts")
    register_model(f"plain{_d}", "cifar-plain", lambda c, s, d=_d: CifarResNet(d, c, plain=True),
                   f"plain twin of resnet{_d} (no shortcuts)")

register_adapter(CifarBasicBlock, lambda b: BlockParts(b.residual, b.shortcut, relu=True))
register_adapter(CifarPlainBlock, lambda b: BlockParts(b.forward, None))
register_model_adapter(CifarResNet, lambda m: ModelParts(
    m.stem, [(f"{s}.{i}", b) for s in ("layer1", "layer2", "layer3") for i, b in enumerate(getattr(m, s))], m.head))
