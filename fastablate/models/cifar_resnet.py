"""The CIFAR ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition",
Sec. 4.2), the pre-activation ResNets of He et al. 2016 ("Identity Mappings in Deep Residual
Networks"), and their plain twins.

ResNet-(6n+2): a 3x3 stem conv with 16 channels, three stages of n blocks with 16, 32, 64
channels (stride 2 at the first block of stages 2 and 3), global average pool, linear.
Shortcuts are option A: identity, or subsampling plus zero-padding of the new channels
where the shape changes, so every block has a parameter-free shortcut. The plain twin has
the same layers without shortcuts.

Pre-activation ResNet-(6n+2): units ``x + conv(relu(bn(conv(relu(bn(x))))))`` with nothing
after the add, so deleting a unit keeps exactly its shortcut; where the shape changes the
shortcut is a 1x1 projection of the pre-activated input (He et al.'s CIFAR code); a final
BN-ReLU before the pool. PreResNet-(9n+2) of depth 164 and more uses bottleneck units
(1x1, 3x3, 1x1 with 4x channels: 64, 128, 256), as He et al.'s PreResNet-164 and -1001 do.

Any depth by name: ``resnetN``/``plainN``/``preresnetN``/``preplainN`` for N = 6n+2 (and
``preresnetN`` with N = 9n+2 >= 164) that no other family registers (see :func:`by_depth`).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastablate.models.registry import register_model, register_model_pattern
from fastablate.units import BlockParts, ModelParts, register_adapter, register_model_adapter


def stochastic(block: nn.Module, residual, x: Tensor) -> Tensor | None:
    """The residual branch of a unit under stochastic depth (Huang et al. 2016) with survival
    probability ``block.survival`` p: in training, computed with probability p (one draw per
    batch) and None (the unit is skipped) otherwise; at test time scaled by p."""
    p = getattr(block, "survival", 1.0)
    if p >= 1.0:
        return residual(x)
    if block.training:
        return residual(x) if float(torch.rand(())) < p else None
    return residual(x) * p


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
        r = stochastic(self, self.residual, x)
        return F.relu(self.shortcut(x) if r is None else self.shortcut(x) + r)


class CifarPlainBlock(CifarBasicBlock):
    """The same two conv layers without the shortcut: relu(bn2(conv2(relu(bn1(conv1(x))))))."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(cin, cout, stride)
        del self.shortcut

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.residual(x))


class PreActBlock(nn.Module):
    """x' = shortcut(x) + conv2(relu(bn2(conv1(relu(bn1(x)))))): a pre-activation unit, nothing
    after the add. A changing shape takes a 1x1 projection of relu(bn1(x)) as its shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout, 1)
        self.proj = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None

    def residual(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.proj is None else self.proj(F.relu(self.bn1(x)))

    def forward(self, x: Tensor) -> Tensor:
        r = stochastic(self, self.residual, x)
        return self.shortcut(x) if r is None else self.shortcut(x) + r


class PreActBottleneck(PreActBlock):
    """The bottleneck unit: 1x1 (cout/4), 3x3 (cout/4, the stride), 1x1 (cout), each after BN-ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        nn.Module.__init__(self)
        mid = cout // 4
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = _conv3x3(mid, mid, stride)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.proj = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None

    def residual(self, x: Tensor) -> Tensor:
        h = self.conv1(F.relu(self.bn1(x)))
        return self.conv3(F.relu(self.bn3(self.conv2(F.relu(self.bn2(h))))))


class PrePlainBlock(PreActBlock):
    """The pre-activation unit without its shortcut: conv2(relu(bn2(conv1(relu(bn1(x))))))."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(cin, cout, stride)
        self.proj = None

    def forward(self, x: Tensor) -> Tensor:
        return self.residual(x)


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


class PreActResNet(nn.Module):
    """Pre-activation ResNet for 32x32 inputs: depth 6n+2 (basic units) or, with ``bottleneck``,
    9n+2; ``plain=True`` gives the twin without shortcuts (basic units)."""

    def __init__(self, depth: int, num_classes: int = 10, plain: bool = False, bottleneck: bool = False,
                 in_channels: int = 3):
        super().__init__()
        per, widths = (9, (64, 128, 256)) if bottleneck else (6, (16, 32, 64))
        if (depth - 2) % per or depth < per + 2:
            raise ValueError(f"pre-activation ResNet depth must be {per}n+2, got {depth}")
        n = (depth - 2) // per
        block = PreActBottleneck if bottleneck else PrePlainBlock if plain else PreActBlock
        self.conv1 = _conv3x3(in_channels, 16, 1)
        stages, cin = [], 16
        for i, cout in enumerate(widths):
            stages.append(nn.Sequential(*[block(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1)
                                          for j in range(n)]))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(cin)  # the last unit's output is not activated: BN-ReLU before the pool
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, x: Tensor) -> Tensor:
        return self.conv1(x)

    def head(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(F.relu(self.bn(x))).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def by_depth(name: str):
    """(family, build, description) of a CIFAR model named by its depth (``resnet26``,
    ``plain26``, ``preresnet50``, ``preresnet164``), or None when the name is not of that
    form; a depth the family cannot have is a ValueError naming the valid ones."""
    m = re.fullmatch(r"(resnet|plain|preresnet|preplain)(\d+)", name)
    if m is None:
        return None
    kind, depth = m.group(1), int(m.group(2))
    bottleneck = kind == "preresnet" and depth >= 164 and (depth - 2) % 9 == 0
    if not bottleneck and ((depth - 2) % 6 or depth < 8):
        near = sorted({max(8, depth - (depth - 2) % 6), depth - (depth - 2) % 6 + 6})
        raise ValueError(f"a CIFAR {kind} has depth 6n+2 (e.g. {', '.join(f'{kind}{d}' for d in near)})"
                         + ("; preresnet also 9n+2 >= 164 (bottleneck units)" if kind == "preresnet" else ""))
    if kind in ("resnet", "plain"):
        plain = kind == "plain"
        return (f"cifar-{kind}", lambda c, s: CifarResNet(depth, c, plain=plain),
                f"plain twin of resnet{depth} (no shortcuts)" if plain else
                f"CIFAR ResNet-{depth} (He et al. 2016), option-A shortcuts")
    plain = kind == "preplain"
    return ("cifar-preplain" if plain else "cifar-preresnet",
            lambda c, s: PreActResNet(depth, c, plain=plain, bottleneck=bottleneck),
            f"plain twin of preresnet{depth} (no shortcuts)" if plain else
            f"pre-activation ResNet-{depth} (He et al. 2016, Identity Mappings)"
            + (", bottleneck units" if bottleneck else ""))


DEPTHS = (8, 14, 20, 32, 44, 56, 110)
PRE_DEPTHS = (20, 32, 44, 56, 110, 164)
for _name in [f"{k}{d}" for d in DEPTHS for k in ("resnet", "plain")] + \
        [f"{k}{d}" for d in PRE_DEPTHS for k in ("preresnet", "preplain") if (k, d) != ("preplain", 164)]:
    register_model(_name, *by_depth(_name))

register_model_pattern(by_depth, "resnetN, plainN, preresnetN, preplainN for any N = 6n+2 (preresnetN also "
                                 "9n+2 >= 164: bottleneck)")

def _residual(b: nn.Module):
    """The residual branch as the unit view computes it: at test time, scaled by the unit's
    survival probability under stochastic depth."""
    p = getattr(b, "survival", 1.0)
    return b.residual if p >= 1.0 else (lambda x: b.residual(x) * p)


def set_stochastic_depth(net: nn.Module, last: float) -> list[float]:
    """Stochastic depth over the residual units of a CIFAR ResNet or pre-activation ResNet with
    the linear decay rule (Huang et al. 2016): survival 1 at the first unit, ``last`` at the
    last, linear between (1.0 everywhere turns it off). Returns the probabilities, in order.
    (``net.set_stochastic_depth(last)``: how the registry finds it.)"""
    blocks = [b for s in ("layer1", "layer2", "layer3") for b in getattr(net, s, ())
              if isinstance(b, (CifarBasicBlock, PreActBlock)) and not isinstance(b, (CifarPlainBlock, PrePlainBlock))]
    if not blocks:
        raise ValueError(f"{type(net).__name__} is a plain net: it has no residual units to drop")
    n = len(blocks)
    probs = [1.0 - (i / (n - 1) if n > 1 else 1.0) * (1.0 - last) for i in range(n)]
    for b, p in zip(blocks, probs):
        b.survival = p
    return probs


CifarResNet.set_stochastic_depth = PreActResNet.set_stochastic_depth = set_stochastic_depth


register_adapter(CifarBasicBlock, lambda b: BlockParts(_residual(b), b.shortcut, relu=True))
register_adapter(CifarPlainBlock, lambda b: BlockParts(b.forward, None))
register_adapter(PreActBlock, lambda b: BlockParts(_residual(b), b.shortcut if b.proj is not None else nn.Identity()))
register_adapter(PrePlainBlock, lambda b: BlockParts(b.residual, None))
register_model_adapter(PreActResNet, lambda m: ModelParts(
    m.stem, [(f"{s}.{i}", b) for s in ("layer1", "layer2", "layer3") for i, b in enumerate(getattr(m, s))], m.head))
register_model_adapter(CifarResNet, lambda m: ModelParts(
    m.stem, [(f"{s}.{i}", b) for s in ("layer1", "layer2", "layer3") for i, b in enumerate(getattr(m, s))], m.head))
