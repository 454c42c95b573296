"""Model registry: ``build_model(name, num_classes, ...)`` and checkpoints.

Every model is wrapped in :class:`NormalizedModel`, so engines feed inputs in [0, 1] and
normalization travels with the weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fastablate.errors import FastablateError
from fastablate.models import cifar_resnet, torchvision_nets


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "cifar-resnet", "cifar-plain", "resnet", "plain-resnet", "vgg"
    build: Callable[[int, int], nn.Module]  # (num_classes, image_size) -> net
    description: str


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, family: str, build: Callable[[int, int], nn.Module], description: str) -> None:
    """Add a model to the registry; ``build(num_classes, image_size)`` returns the bare net."""
    MODELS[name] = ModelSpec(name, family, build, description)


for _d in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_d}", "cifar-resnet",
                   lambda c, s, d=_d: cifar_resnet.CifarResNet(d, c),
                   f"CIFAR ResNet-{_d} (He et al. 2016), option-A shortcuts")
    register_model(f"plain{_d}", "cifar-plain",
                   lambda c, s, d=_d: cifar_resnet.CifarResNet(d, c, plain=True),
                   f"plain twin of resnet{_d} (no shortcuts)")
for _d in (18, 34, 50):
    register_model(f"resnet{_d}", "resnet", lambda c, s, d=_d: torchvision_nets.resnet(d, c, s),
                   f"torchvision ResNet-{_d}; CIFAR stem for inputs <= 64 px")
for _d in (18, 34):
    register_model(f"plain{_d}", "plain-resnet", lambda c, s, d=_d: torchvision_nets.resnet(d, c, s, plain=True),
                   f"plain twin of resnet{_d} (no shortcuts)")
for _cfg, _d in (("A", 11), ("B", 13), ("D", 16), ("E", 19)):
    for _bn in (False, True):
        register_model(f"vgg{_d}{'_bn' if _bn else ''}", "vgg",
                       lambda c, s, cfg=_cfg, bn=_bn: torchvision_nets.vgg(cfg, c, s, bn),
                       f"torchvision VGG-{_d}{' with batch norm' if _bn else ''}; one-linear head for inputs <= 64 px")


class NormalizedModel(nn.Module):
    """``net((x - mean) / std)`` for inputs x in [0, 1]; carries the model's registry name."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], arch: str = "custom",
                 num_classes: int | None = None, image_size: int | None = None):
        super().__init__()
        self.net = net
        self.arch, self.num_classes, self.image_size = arch, num_classes, image_size
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))

    def extra_repr(self) -> str:
        fmt = lambda t: ",".join(f"{v:.4g}" for v in t.flatten().tolist())  # noqa: E731
        return f"arch={self.arch}, mean=({fmt(self.mean)}), std=({fmt(self.std)})"


def model_names() -> list[str]:
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise FastablateError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str, num_classes: int = 10, *, image_size: int = 32,
                mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> NormalizedModel:
    """A freshly initialized registry model, wrapped with its input normalization.

    Args:
        name: a registry name (``fastablate models`` lists them).
        num_classes: outputs of the final linear layer.
        image_size: input height/width in pixels; picks the CIFAR or ImageNet stem.
        mean, std: per-channel normalization of inputs in [0, 1].
    """
    spec = get_spec(name)
    if num_classes < 1:
        raise FastablateError(f"num_classes must be >= 1, got {num_classes}")
    return NormalizedModel(spec.build(num_classes, image_size), mean, std, name, num_classes, image_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


from fastablate.models.checkpoint import load_model, save_checkpoint  # noqa: E402

__all__ = ["MODELS", "ModelSpec", "NormalizedModel", "build_model", "count_parameters", "get_spec",
           "load_model", "model_names", "register_model", "save_checkpoint"]
