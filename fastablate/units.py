"""The unit view: every engine sees a model as ``stem -> unit_1 ... unit_n -> head``.

A unit is a residual block, ``out = post(shortcut(x) + residual(x))`` (post = ReLU for
post-activation ResNets, identity for pre-activation ones), or, in a plain net, a layer
group with no shortcut. Lesioning a unit (Veit et al. 2016) keeps its shortcut alone,
``post(shortcut(x))``; a plain unit becomes the identity when its input and output
shapes match and is not lesionable otherwise.

Adapters cover the registry models and torchvision ResNet/VGG instances. A new block
type needs one call::

    register_adapter(MyBlock, lambda b: BlockParts(residual=b.branch, shortcut=b.skip, post=F.relu))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models import vgg as tv_vgg

from fastablate.errors import FastablateError
from fastablate.models import NormalizedModel
from fastablate.models.cifar_resnet import CifarBasicBlock, CifarPlainBlock, CifarResNet
from fastablate.models.torchvision_nets import PlainBasicBlock

Fn = Callable[[Tensor], Tensor]
KINDS = ("identity-skip", "projection-skip", "plain")


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass
class BlockParts:
    """How one block computes: ``post(shortcut(x) + residual(x))``; shortcut None for plain."""

    residual: Fn
    shortcut: Fn | None
    post: Fn = _identity


@dataclass
class Unit:
    """One unit of a model, in forward order."""

    name: str
    module: nn.Module
    kind: str  # one of KINDS
    parts: BlockParts = field(repr=False)
    in_shape: tuple[int, ...] = ()  # (C, H, W) of one sample
    out_shape: tuple[int, ...] = ()
    reason: str | None = None  # why the unit is not lesionable; None when it is

    @property
    def lesionable(self) -> bool:
        return self.reason is None

    def __call__(self, x: Tensor) -> Tensor:
        return self.module(x)

    def lesioned(self, x: Tensor) -> Tensor:
        """The unit deleted: ``post(shortcut(x))``, or ``x`` for a plain unit."""
        if not self.lesionable:
            raise FastablateError(f"unit {self.name} is not lesionable: {self.reason}")
        return x if self.parts.shortcut is None else self.parts.post(self.parts.shortcut(x))


@dataclass
class UnitView:
    """``stem -> units -> head`` of a model; ``forward`` with no lesion equals ``model(x)``."""

    stem: Fn
    units: list[Unit]
    head: Fn

    def __getitem__(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise FastablateError(f"unknown unit {name!r}; units are: {', '.join(u.name for u in self.units)}")

    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def lesionable(self) -> list[Unit]:
        return [u for u in self.units if u.lesionable]

    def forward(self, x: Tensor, lesion: Sequence[str] = (), order: Sequence[str] | None = None) -> Tensor:
        """Run the model with the units named in ``lesion`` deleted and, with ``order``, the
        units executed in that order (a permutation of all unit names). One variant for all
        rows: this is the plain one-model-per-variant loop the lesion engine is checked against."""
        drop = set(lesion)
        for name in drop:
            self[name]  # unknown names fail here, before any work
        seq = self.units if order is None else [self[name] for name in order]
        if order is not None and sorted(u.name for u in seq) != sorted(self.names()):
            raise FastablateError(f"order {list(order)} is not a permutation of the units {self.names()}")
        h = self.stem(x)
        for u in seq:
            h = u.lesioned(h) if u.name in drop else u(h)
        return self.head(h)


# --- block adapters: block type -> BlockParts --------------------------------------------
_BLOCK_ADAPTERS: dict[type, Callable[[nn.Module], BlockParts]] = {}


def register_adapter(block_type: type, fn: Callable[[nn.Module], BlockParts]) -> None:
    """Teach the unit view a block type: ``fn(block)`` returns its :class:`BlockParts`."""
    _BLOCK_ADAPTERS[block_type] = fn


def block_parts(block: nn.Module) -> BlockParts | None:
    for t in type(block).__mro__:
        if t in _BLOCK_ADAPTERS:
            return _BLOCK_ADAPTERS[t](block)
    return None


def _tv_basic(b: tv_resnet.BasicBlock) -> BlockParts:
    return BlockParts(lambda x: b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x))))),
                      b.downsample if b.downsample is not None else _identity, b.relu)


def _tv_bottleneck(b: tv_resnet.Bottleneck) -> BlockParts:
    def residual(x):
        out = b.relu(b.bn1(b.conv1(x)))
        out = b.relu(b.bn2(b.conv2(out)))
        return b.bn3(b.conv3(out))
    return BlockParts(residual, b.downsample if b.downsample is not None else _identity, b.relu)


register_adapter(CifarBasicBlock, lambda b: BlockParts(b.residual, b.shortcut, F.relu))
register_adapter(CifarPlainBlock, lambda b: BlockParts(lambda x: F.relu(b.residual(x)), None))
register_adapter(tv_resnet.BasicBlock, _tv_basic)
register_adapter(tv_resnet.Bottleneck, _tv_bottleneck)
register_adapter(PlainBasicBlock, lambda b: BlockParts(b.forward, None))
register_adapter(nn.Sequential, lambda s: BlockParts(s.forward, None))  # a VGG layer group


# --- model adapters: model -> (stem, [(name, block)], head) ----------------------------------
def _cifar_resnet(m: CifarResNet):
    blocks = [(f"{s}.{i}", b) for s in ("layer1", "layer2", "layer3") for i, b in enumerate(getattr(m, s))]
    return m.stem, blocks, m.head


def _tv_resnet(m: tv_resnet.ResNet):
    def stem(x):
        return m.maxpool(m.relu(m.bn1(m.conv1(x))))

    def head(x):
        return m.fc(torch.flatten(m.avgpool(x), 1))
    blocks = [(f"{s}.{i}", b) for s in ("layer1", "layer2", "layer3", "layer4") for i, b in enumerate(getattr(m, s))]
    return stem, blocks, head


def _tv_vgg(m: tv_vgg.VGG):
    """One unit per conv layer with the BN/ReLU/max-pool that follow it, named by the
    conv's index in ``features``."""
    groups: list[tuple[str, list[nn.Module]]] = []
    for i, layer in enumerate(m.features):
        if isinstance(layer, nn.Conv2d) or not groups:
            groups.append((f"features.{i}", []))
        groups[-1][1].append(layer)

    def head(x):
        return m.classifier(torch.flatten(m.avgpool(x), 1))
    return _identity, [(name, nn.Sequential(*layers)) for name, layers in groups], head


_MODEL_ADAPTERS: list[tuple[type, Callable]] = [
    (CifarResNet, _cifar_resnet), (tv_resnet.ResNet, _tv_resnet), (tv_vgg.VGG, _tv_vgg)]


def _kind(parts: BlockParts) -> str:
    if parts.shortcut is None:
        return "plain"
    return "identity-skip" if parts.shortcut is _identity or isinstance(parts.shortcut, nn.Identity) \
        else "projection-skip"


def units(model: nn.Module, input_shape: Sequence[int] | None = None) -> UnitView:
    """The unit view of ``model`` (a NormalizedModel or a bare registry/torchvision net).

    Args:
        model: the model; a NormalizedModel's normalization becomes part of the stem.
        input_shape: (C, H, W) of one input, for the per-unit shapes; default
            (3, image_size, image_size) of the model, or (3, 32, 32).
    """
    net, pre = model, _identity
    if isinstance(model, NormalizedModel):
        net, pre = model.net, model.normalize
    for t, adapt in _MODEL_ADAPTERS:
        if isinstance(net, t):
            stem, blocks, head = adapt(net)
            break
    else:
        raise FastablateError(f"no unit adapter for model type {type(net).__name__}; "
                              "supported: CIFAR ResNets, torchvision ResNet and VGG")
    out: list[Unit] = []
    for name, block in blocks:
        parts = block_parts(block)
        if parts is None:
            raise FastablateError(f"no unit adapter for block type {type(block).__name__} at {name}; "
                                  "add one with fastablate.units.register_adapter")
        out.append(Unit(name, block, _kind(parts), parts))

    def full_stem(x):
        return stem(pre(x))
    view = UnitView(full_stem, out, head)
    _probe_shapes(view, model, input_shape)
    return view


def _probe_shapes(view: UnitView, model: nn.Module, input_shape) -> None:
    """Fill in/out shapes with one forward pass of a zero image in eval mode."""
    if input_shape is None:
        size = getattr(model, "image_size", None) or 32
        input_shape = (3, size, size)
    p = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None else torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            h = view.stem(x)
            for u in view.units:
                u.in_shape = tuple(h.shape[1:])
                h = u(h)
                u.out_shape = tuple(h.shape[1:])
                if u.kind == "plain" and u.in_shape != u.out_shape:
                    u.reason = f"plain unit changes shape {u.in_shape} -> {u.out_shape}"
    finally:
        model.train(was_training)
