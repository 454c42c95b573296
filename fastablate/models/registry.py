"""The model registry (``register_model``, ``build_model``) and :class:`NormalizedModel`.

Each model family registers its names, and teaches the unit view its block types, from its
own file (``cifar_resnet.py``, ``torchvision_nets.py``), as timm's families do.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fastablate.errors import FastablateError, first_line
from fastablate.modes import eval_mode
from fastablate.units import ModelParts, model_parts, register_model_adapter


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "cifar-resnet", "cifar-plain", "resnet", "plain-resnet", "vgg", or a user's
    build: Callable[..., nn.Module]  # (num_classes, image_size[, stem]) -> net
    description: str
    stems: bool = False  # build takes a stem: "cifar" or "imagenet"


MODELS: dict[str, ModelSpec] = {}
SMALL_INPUT = 64  # pixels: the default stem of models with two is the CIFAR one up to this size
STEMS = ("cifar", "imagenet")


def default_stem(image_size: int) -> str:
    return "cifar" if image_size <= SMALL_INPUT else "imagenet"

# Families of names (``resnet26``): (resolve, the pattern as a user reads it); resolve(name)
# returns (family, build, description) or a ModelSpec, None for a name not of its form, or
# raises ValueError.
PATTERNS: list[tuple[Callable[[str], tuple | None], str]] = []


def register_model(name: str, family: str, build: Callable[..., nn.Module], description: str,
                   stems: bool = False) -> None:
    """Add a model to the registry; ``build(num_classes, image_size)`` returns the bare net
    (``build(num_classes, image_size, stem)`` with ``stems``: a CIFAR and an ImageNet stem)."""
    MODELS[name] = ModelSpec(name, family, build, description, stems)


def register_model_pattern(resolve: Callable[[str], tuple | None], pattern: str) -> None:
    """Add a family of names the registry does not list one by one (any depth of a family)."""
    PATTERNS.append((resolve, pattern))


def is_external(name: str) -> bool:
    """A timm or user-factory spec (``timm:NAME``, ``file.py:factory``), not a registry name."""
    return ":" in name


def runs_code(name: str) -> bool:
    """A user's factory (``file.py:factory``, ``package.module:factory``): building it imports and
    runs that code. timm's models and the registry's do not."""
    return is_external(name) and not name.startswith("timm:")


def short_name(arch: str) -> str:
    """How results call a model: a file spec by its file's name, anything else as it is."""
    where, _, factory = arch.rpartition(":")
    return f"{Path(where).name}:{factory}" if where.endswith(".py") else arch


def outputs(net: nn.Module, image_size: int, channels: int = 3) -> int:
    """The number of outputs of ``net`` for one image (its class count)."""
    p = next(net.parameters(), None)
    try:
        with eval_mode(net), torch.no_grad():
            out = net(torch.zeros(1, channels, image_size, image_size, device=p.device if p is not None else "cpu"))
    except Exception as e:
        raise FastablateError(f"the model cannot take a {image_size}x{image_size} image: {type(e).__name__}: "
                              f"{first_line(e)}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise FastablateError(f"the model returns {type(out).__name__}"
                              f"{' of shape ' + str(tuple(out.shape)) if isinstance(out, torch.Tensor) else ''}; "
                              "the studies need logits of shape (batch, classes)")
    return out.shape[1]



class NormalizedModel(nn.Module):
    """``net((x - mean) / std)`` for inputs x in [0, 1]; carries the model's registry name.

    ``name`` is how results call the model (the registry name, unless two models of one
    study share it).
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], arch: str = "custom",
                 num_classes: int | None = None, image_size: int | None = None, head: str = "linear",
                 dropout: float = 0.0, stochastic_depth: float = 1.0, stem: str | None = None,
                 dropout_after: Sequence[str] = ()):
        super().__init__()
        self.net = net
        self.arch, self.num_classes, self.image_size = arch, num_classes, image_size
        self.stem = stem  # "cifar" or "imagenet" for the models that have both (checkpoints record it)
        self.head, self.dropout = head, dropout  # how build_model made the head (checkpoints record it)
        self.dropout_after = tuple(dropout_after)  # body modules followed by a dropout of ``dropout``
        self.stochastic_depth = stochastic_depth  # survival of the last residual unit (1.0: off)
        shown = short_name(arch)
        self.name = shown if stochastic_depth >= 1.0 else f"{shown} (stochastic depth {stochastic_depth:g})"
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
    return ModelParts(lambda x: inner.stem(m.normalize(x)), inner.blocks, inner.head, inner.block_parts)


register_model_adapter(NormalizedModel, _normalized_parts)


def model_names() -> list[str]:
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    if name in MODELS:
        return MODELS[name]
    for resolve, _ in PATTERNS:
        try:
            found = resolve(name)
        except ValueError as e:
            raise FastablateError(f"unknown model {name!r}: {e}") from None
        if isinstance(found, ModelSpec):
            return found
        if found is not None:
            return ModelSpec(name, *found)
    patterns = "".join(f"; or {p}" for _, p in PATTERNS)
    raise FastablateError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}{patterns}")


def build_model(name: str, num_classes: int | None = 10, *, image_size: int = 32,
                mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                head: str = "linear", dropout: float = 0.0, stochastic_depth: float = 1.0,
                stem: str | None = None, dropout_after: Sequence[str] | None = None) -> NormalizedModel:
    """A freshly initialized registry model, wrapped with its input normalization.

    Args:
        name: a registry name (``fastablate models`` lists them), ``timm:NAME`` or a factory
            (``path/to/file.py:factory``, ``package.module:factory``).
        num_classes: outputs of the final linear layer; None: whatever the factory of an
            external model gives (a registry model needs it).
        image_size: input height/width in pixels; picks the CIFAR (up to 64 px) or ImageNet stem
            of the models with both.
        stem: ``cifar`` or ``imagenet`` whatever the size (torchvision ResNets, their plain
            twins and VGGs; the VGG's "stem" is its small-input head).
        mean, std: per-channel normalization of inputs in [0, 1].
        head: ``linear`` (the model's own), ``mlp:512,256`` or the layers as written
            (``linear:128,relu,dropout:0.3,linear``; see :func:`fastablate.models.transfer.parse_head`).
        dropout: the dropout probability of ``dropout_after``.
        dropout_after: where that dropout goes: ``head`` (before a linear head, after each
            hidden ReLU of an mlp: head) and body modules by name (``layer3``, ``layer4.1``);
            default: the head.
        stochastic_depth: survival probability of the last residual unit under stochastic depth
            (Huang et al. 2016; linear decay from 1 at the first unit); 1.0: off.
    """
    from fastablate.models.transfer import dropout_after as add_dropout, head_spec, parse_head, set_head

    spec = get_spec(name)
    name = spec.name  # a file factory by its absolute path
    net, stem, num_classes = _body(spec, num_classes, image_size, stem)
    places = ("head",) if dropout_after is None else tuple(dropout_after)
    body = tuple(n for n in places if n != "head")
    try:
        layers = parse_head(head, dropout if "head" in places else 0.0)
    except ValueError as e:
        raise FastablateError(f"--head {head!r}: {e}") from None
    if layers != (("linear", None),):
        set_head(net, num_classes, layers)
    if stochastic_depth < 1.0:
        setter = getattr(net, "set_stochastic_depth", None)
        if setter is None:
            raise FastablateError(f"--stochastic-depth {stochastic_depth:g}: model {name} ({spec.family}) does not "
                                  "support it; the CIFAR ResNets do (resnetN, preresnetN)")
        try:
            setter(stochastic_depth)
        except ValueError as e:
            raise FastablateError(f"--stochastic-depth {stochastic_depth:g}: model {name}: {e}") from None
    model = NormalizedModel(net, mean, std, name, num_classes, image_size, head_spec(layers), dropout,
                            stochastic_depth, stem, body)
    if body and dropout > 0:
        add_dropout(model, body, dropout)
    return model


def _body(spec: ModelSpec, num_classes: int | None, image_size: int, stem: str | None) -> tuple[nn.Module, str | None,
                                                                                                int]:
    """(the bare net of ``spec``, its stem, its class count: an external model's from its output)."""
    name = spec.name
    if num_classes is None and not is_external(name):
        raise FastablateError(f"model {name}: num_classes is needed")
    if num_classes is not None and num_classes < 1:
        raise FastablateError(f"num_classes must be >= 1, got {num_classes}")
    if stem is not None and stem not in STEMS:
        raise FastablateError(f"--stem {stem!r}: choose from {', '.join(STEMS)}")
    if stem is not None and not spec.stems:
        raise FastablateError(f"--stem {stem}: model {name} ({spec.family}) has one stem; "
                              f"{', '.join(n for n, m in MODELS.items() if m.stems)} have two")
    if spec.stems:
        stem = stem or default_stem(image_size)
        net = spec.build(num_classes, image_size, stem)
    else:
        net = spec.build(num_classes, image_size)
    if is_external(name):
        found = outputs(net, image_size)
        if num_classes is not None and found != num_classes:
            raise FastablateError(f"model {short_name(name)} gives {found} outputs, not {num_classes}: its factory "
                                  "does not take num_classes; make one that does, or use data of that many classes")
        num_classes = found
    return net, stem, num_classes


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
