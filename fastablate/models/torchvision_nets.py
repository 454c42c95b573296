"""torchvision ResNets and VGGs, with a CIFAR stem for small inputs, and plain ResNet twins.

For inputs of at most 64x64 pixels the ResNet stem is a 3x3 stride-1 conv without
max-pool, and the VGG head is one linear layer on the pooled 512 features (the usual
CIFAR adaptation); larger inputs keep torchvision's ImageNet stem and head.
"""
from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models import vgg as tv_vgg

SMALL_INPUT = 64  # pixels: at most this uses the CIFAR stem


class PlainBasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock without its shortcut (the plain twin of ResNet-18/34)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, *args, **kwargs):
        super().__init__(inplanes, planes, stride, None, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)))


_RESNET_LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3]}


def resnet(depth: int, num_classes: int, image_size: int, plain: bool = False) -> tv_resnet.ResNet:
    if plain:
        block = PlainBasicBlock
    else:
        block = tv_resnet.Bottleneck if depth >= 50 else tv_resnet.BasicBlock
    model = tv_resnet.ResNet(block, _RESNET_LAYERS[depth], num_classes=num_classes)
    if image_size <= SMALL_INPUT:
        model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


def vgg(cfg: str, num_classes: int, image_size: int, batch_norm: bool) -> tv_vgg.VGG:
    model = tv_vgg.VGG(tv_vgg.make_layers(tv_vgg.cfgs[cfg], batch_norm=batch_norm), num_classes=num_classes)
    if image_size <= SMALL_INPUT:
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(512, num_classes)
    return model
