"""torchvision ResNets and VGGs, with a CIFAR stem for small inputs, and plain ResNet twins.

With the CIFAR stem (by default for inputs of at most 64x64 pixels) the ResNet stem is a
3x3 stride-1 conv without max-pool, and the VGG head is one linear layer on the pooled 512
features (the usual CIFAR adaptation); the ImageNet stem (larger inputs, or ``stem``) keeps
torchvision's stem and head, so every ImageNet weight has its place. The unit view
covers these and any torchvision ResNet/VGG instance a user builds.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models import vgg as tv_vgg

from fastablate.models.registry import register_model
from fastablate.units import BlockParts, ModelParts, register_adapter, register_model_adapter


class PlainBasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock without its shortcut (the plain twin of ResNet-18/34)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, *args, **kwargs):
        super().__init__(inplanes, planes, stride, None, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)))


_RESNET_LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3]}
VGG_CONFIGS = {11: "A", 13: "B", 16: "D", 19: "E"}


def resnet(depth: int, num_classes: int, stem: str, plain: bool = False) -> tv_resnet.ResNet:
    if plain:
        block = PlainBasicBlock
    else:
        block = tv_resnet.Bottleneck if depth >= 50 else tv_resnet.BasicBlock
    model = tv_resnet.ResNet(block, _RESNET_LAYERS[depth], num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


def vgg(cfg: str, num_classes: int, stem: str, batch_norm: bool) -> tv_vgg.VGG:
    model = tv_vgg.VGG(tv_vgg.make_layers(tv_vgg.cfgs[cfg], batch_norm=batch_norm), num_classes=num_classes)
    if stem == "cifar":
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(512, num_classes)
    return model


for _d in (18, 34, 50):
    register_model(f"resnet{_d}", "resnet", lambda c, s, stem, d=_d: resnet(d, c, stem),
                   f"torchvision ResNet-{_d}; CIFAR stem for inputs <= 64 px", stems=True)
for _d in (18, 34):
    register_model(f"plain{_d}", "plain-resnet", lambda c, s, stem, d=_d: resnet(d, c, stem, plain=True),
                   f"plain twin of resnet{_d} (no shortcuts)", stems=True)
for _d, _cfg in VGG_CONFIGS.items():
    for _bn in (False, True):
        register_model(f"vgg{_d}{'_bn' if _bn else ''}", "vgg",
                       lambda c, s, stem, cfg=_cfg, bn=_bn: vgg(cfg, c, stem, bn),
                       f"torchvision VGG-{_d}{' with batch norm' if _bn else ''}; one-linear head for inputs <= 64 px",
                       stems=True)


# --- the unit view of torchvision ResNets and VGGs ------------------------------------------
def _shortcut(b: nn.Module) -> nn.Module:
    return b.downsample if b.downsample is not None else nn.Identity()


def _basic(b: tv_resnet.BasicBlock) -> BlockParts:
    return BlockParts(lambda x: b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x))))), _shortcut(b), relu=True)


def _bottleneck(b: tv_resnet.Bottleneck) -> BlockParts:
    def residual(x):
        out = b.relu(b.bn1(b.conv1(x)))
        out = b.relu(b.bn2(b.conv2(out)))
        return b.bn3(b.conv3(out))
    return BlockParts(residual, _shortcut(b), relu=True)


def _resnet_parts(m: tv_resnet.ResNet) -> ModelParts:
    def stem(x):
        return m.maxpool(m.relu(m.bn1(m.conv1(x))))

    def head(x):
        return m.fc(torch.flatten(m.avgpool(x), 1))
    blocks = [(f"{s}.{i}", b) for s in ("layer1", "layer2", "layer3", "layer4") for i, b in enumerate(getattr(m, s))]
    return ModelParts(stem, blocks, head)


def _vgg_parts(m: tv_vgg.VGG) -> ModelParts:
    """One unit per conv layer with the BN/ReLU/max-pool that follow it, named by the
    conv's index in ``features``."""
    groups: list[tuple[str, list[nn.Module]]] = []
    for i, layer in enumerate(m.features):
        if isinstance(layer, nn.Conv2d) or not groups:
            groups.append((f"features.{i}", []))
        groups[-1][1].append(layer)

    def head(x):
        return m.classifier(torch.flatten(m.avgpool(x), 1))
    return ModelParts(nn.Identity(), [(name, nn.Sequential(*layers)) for name, layers in groups], head)


register_adapter(tv_resnet.BasicBlock, _basic)
register_adapter(tv_resnet.Bottleneck, _bottleneck)
register_adapter(PlainBasicBlock, lambda b: BlockParts(b.forward, None))
register_adapter(nn.Sequential, lambda s: BlockParts(s.forward, None))  # a VGG layer group
register_model_adapter(tv_resnet.ResNet, _resnet_parts)
register_model_adapter(tv_vgg.VGG, _vgg_parts)
