"""The model registry (``register_model``, ``build_model``) and :class:`NormalizedModel`.

Each model family registers its names, and teaches the unit view its block types, from its
own file (``cifar_resnet.py``, ``torchvision_nets.py``), as timm's families do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fastablate.errors import FastablateError
from fastablate.units import ModelParts, model_parts, register_model_adapter


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "cifar-resnet", "cifar-plain", "resnet", "plain-resnet", "vgg", or a user's
    build: Callable[[int, int], nn.Module]  # (num_classes, image_size) -> net
    description: str


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, family: str, build: Callable[[int, int], nn.Module], description: str) -> None:
    """Add a model to the registry; ``build(num_classes, image_size)`` returns the bare net."""
    MODELS[name] = ModelSpec(name, family, build, description)


class NormalizedModel(nn.Module):
    """``net((x - mean) / std)`` for inputs x in [0, 1]; carries the model's registry name.

    ``name`` is how results call the model (the registry name, unless two models of one
    study share it).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], arch: str = "custom",
                 num_classes: int | None = None, image_size: int | None = None, head: str = "linear",
                 dropout: float = 0.0):
        super().__init__()
        self.net = net
        self.arch, self.num_classes, self.image_size = arch, num_classes, image_size
        self.head, self.dropout = head, dropout  # how build_model made the head (checkpoints record it)
        self.name = arch
        self.classes: list[str] | None = None  # class names, when known (checkpoints carry them)
        self.meta: dict = {}
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))

    def extra_repr(self) -> str:
        fmt = lambda t: ",".join(f"{v:.4g}" for v in t.flatten().tolist())  # noqa: E731
        return f"arch={self.arch}, mean=({fmt(self.mean)}), std=({fmt(self.std)})"


def _normalized_parts(m: NormalizedModel) -> ModelParts:
    inner = model_parts(m.net)
    return ModelParts(lambda x: inner.stem(m.normalize(x)), inner.blocks, inner.head)


register_model_adapter(NormalizedModel, _normalized_parts)


def model_names() -> list[str]:
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise FastablateError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str, num_classes: int = 10, *, image_size: int = 32,
                mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                head: str = "linear", dropout: float = 0.0) -> NormalizedModel:
    """A freshly initialized registry model, wrapped with its input normalization.

    Args:
        name: a registry name (``fastablate models`` lists them).
        num_classes: outputs of the final linear layer.
        image_size: input height/width in pixels; picks the CIFAR or ImageNet stem.
        mean, std: per-channel normalization of inputs in [0, 1].
        head: ``linear`` (the model's own) or ``mlp:512,256`` (see :mod:`fastablate.models.transfer`).
        dropout: dropout before each head layer.
    """
    from fastablate.models.transfer import parse_head, set_head

    spec = get_spec(name)
    if num_classes < 1:
        raise FastablateError(f"num_classes must be >= 1, got {num_classes}")
    net = spec.build(num_classes, image_size)
    if head != "linear" or dropout > 0:
        try:
            hidden = parse_head(head)
        except ValueError as e:
            raise FastablateError(f"--head {head!r}: {e}") from None
        set_head(net, num_classes, hidden, dropout)
    return NormalizedModel(net, mean, std, name, num_classes, image_size, head, dropout)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
