"""The unit view: every engine sees a model as ``stem -> unit_1 ... unit_n -> head``.

A unit is a residual block, ``out = post(shortcut(x) + residual(x))`` (post = ReLU for
post-activation ResNets, identity for pre-activation ones), or, in a plain net, a layer
group with no shortcut. Lesioning a unit (Veit et al. 2016) keeps its shortcut alone,
``post(shortcut(x))``; a plain unit becomes the identity when its input and output
shapes match and is not lesionable otherwise.

Model families teach the view their types from their own files (``fastablate.models``):
a model adapter splits a model into stem, named blocks and head, and a block adapter
says how one block computes. A new block type needs one call::

    register_adapter(MyBlock, lambda b: BlockParts(residual=b.branch, shortcut=b.skip, relu=True))

A model with neither has its residual units discovered in its traced graph
(:mod:`fastablate.units.discovery`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fastablate.errors import FastablateError
from fastablate.modes import eval_mode
from fastablate.units.discovery import discover
from fastablate.units.parts import BlockParts, Fn, ModelParts

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
        return x if self.parts.shortcut is None else self.parts.apply_post(self.parts.shortcut(x))


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

    def rows(self) -> list[dict]:
        """One row per unit: name, kind, post-activation, shapes, parameters, lesionable or why not."""
        def shape(s):
            return "x".join(map(str, s))
        return [{"unit": u.name, "kind": u.kind, "post": u.parts.post_kind, "in": shape(u.in_shape),
                 "out": shape(u.out_shape), "params": sum(p.numel() for p in u.module.parameters()),
                 "lesionable": "yes" if u.lesionable else f"no: {u.reason}"} for u in self.units]

    def residual(self) -> list[Unit]:
        """The units with a shortcut (the residual blocks)."""
        return [u for u in self.units if u.parts.shortcut is not None]

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


_BLOCK_ADAPTERS: dict[type, Callable[[nn.Module], BlockParts]] = {}
_MODEL_ADAPTERS: dict[type, Callable[[nn.Module], ModelParts]] = {}


def register_adapter(block_type: type, fn: Callable[[nn.Module], BlockParts]) -> None:
    """Teach the unit view a block type: ``fn(block)`` returns its :class:`BlockParts`."""
    _BLOCK_ADAPTERS[block_type] = fn


def register_model_adapter(model_type: type, fn: Callable[[nn.Module], ModelParts]) -> None:
    """Teach the unit view a model type: ``fn(model)`` returns its :class:`ModelParts`."""
    _MODEL_ADAPTERS[model_type] = fn


def _lookup(table: dict, obj):
    for t in type(obj).__mro__:
        if t in table:
            return table[t]
    return None


def block_parts(block: nn.Module) -> BlockParts | None:
    adapt = _lookup(_BLOCK_ADAPTERS, block)
    return adapt(block) if adapt else None


def model_parts(model: nn.Module) -> ModelParts:
    """The stem, blocks and head of ``model`` from its registered model adapter; a model
    without one has its units discovered in its traced graph (:mod:`fastablate.units.discovery`)."""
    adapt = _lookup(_MODEL_ADAPTERS, model)
    return adapt(model) if adapt is not None else discover(model)


def _kind(parts: BlockParts) -> str:
    if parts.shortcut is None:
        return "plain"
    return "identity-skip" if isinstance(parts.shortcut, nn.Identity) else "projection-skip"


def units(model: nn.Module, input_shape: Sequence[int] | None = None, *, discovered: bool = False) -> UnitView:
    """The unit view of ``model``: from its adapter (a registry net, a torchvision ResNet/VGG),
    else discovered in its traced graph (any model with residual units: timm's, a user's).

    Args:
        model: the model; a NormalizedModel's normalization becomes part of the stem.
        input_shape: (C, H, W) of one input, for the per-unit shapes; default
            (3, image_size, image_size) of the model, or (3, 32, 32).
        discovered: discover the units even where an adapter exists (to compare the two).
    """
    if discovered:
        net = getattr(model, "net", model)
        inner = discover(net)
        norm = getattr(model, "normalize", None) if net is not model else None
        mp = inner if norm is None else ModelParts(lambda x: inner.stem(norm(x)), inner.blocks, inner.head,
                                                   inner.block_parts)
    else:
        mp = model_parts(model)
    out: list[Unit] = []
    for i, (name, block) in enumerate(mp.blocks):
        parts = mp.block_parts[i] if mp.block_parts is not None else block_parts(block)
        if parts is None:
            raise FastablateError(f"no unit adapter for block type {type(block).__name__} at {name}; "
                                  "add one with fastablate.units.register_adapter")
        out.append(Unit(name, block, _kind(parts), parts))
    view = UnitView(mp.stem, out, mp.head)
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
    with eval_mode(model), torch.no_grad():
        h = view.stem(x)
        for u in view.units:
            u.in_shape = tuple(h.shape[1:])
            h = u(h)
            u.out_shape = tuple(h.shape[1:])
            if u.kind == "plain" and u.in_shape != u.out_shape:
                u.reason = f"plain unit changes shape {u.in_shape} -> {u.out_shape}"
