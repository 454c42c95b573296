"""Transfer learning: heads, freezing, ImageNet initialization, loading what fits.

- Heads: ``linear`` (the model's own) or ``mlp:512,256`` (hidden widths, ReLU between), each
  linear layer after a dropout of ``dropout``. The head is the net's ``fc`` (ResNets) or
  ``classifier`` (VGGs); checkpoints record the head so they rebuild it.
- Freezing: by unit or module-name prefix (``stem``, ``layer1``, ``layer2.0``, ``head``) or
  the first N top-level children; frozen parameters get no gradient and frozen BatchNorm
  layers keep their running statistics (they stay in eval mode while training).
- ImageNet initialization: torchvision's weights read from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``), never downloaded; tensors that fit are loaded, the rest
  (the CIFAR stem, the head) keep their fresh initialization, and a note lists them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fastablate.errors import FastablateError, note

HEAD_ATTRS = ("fc", "classifier")
# Registry name -> torchvision weights enum with IMAGENET1K_V1.
IMAGENET = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
            **{f"vgg{d}{bn}": f"VGG{d}{bn.upper()}_Weights" for d in (11, 13, 16, 19) for bn in ("", "_bn")}}


def parse_head(text: str) -> tuple[int, ...]:
    """'linear' -> (); 'mlp:512,256' -> (512, 256); ValueError naming the problem."""
    text = str(text).strip()
    if text == "linear":
        return ()
    kind, _, widths = text.partition(":")
    if kind != "mlp" or not widths:
        raise ValueError("is not a head: use linear or mlp:WIDTH,WIDTH,...")
    try:
        hidden = tuple(int(w) for w in widths.split(","))
    except ValueError:
        raise ValueError(f"has widths {widths!r} that are not whole numbers") from None
    if any(not 1 <= w <= 1 << 16 for w in hidden):
        raise ValueError("has a width outside 1..65536")
    return hidden


def head_attr(net: nn.Module) -> str:
    for attr in HEAD_ATTRS:
        if isinstance(getattr(net, attr, None), nn.Module):
            return attr
    raise FastablateError(f"{type(net).__name__} has no head ({' or '.join(HEAD_ATTRS)}) to replace")


def _in_features(head: nn.Module) -> int:
    first = head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))
    return first.in_features


def set_head(net: nn.Module, num_classes: int, hidden: Sequence[int] = (), dropout: float = 0.0) -> None:
    """Replace the net's head by dropout -> linear (-> ReLU -> dropout -> linear ...)."""
    attr = head_attr(net)
    width = _in_features(getattr(net, attr))
    widths = (*hidden, num_classes)
    layers: list[nn.Module] = []
    for i, out in enumerate(widths):
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, out))
        if i < len(widths) - 1:
            layers.append(nn.ReLU(inplace=True))
        width = out
    setattr(net, attr, layers[0] if len(layers) == 1 else nn.Sequential(*layers))


def freeze_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of everything ``--freeze`` may name: top-level children, every unit,
    ``stem`` (the top-level children before the first unit) and ``head``."""
    from fastablate.units import units

    net = getattr(model, "net", model)
    children = dict(net.named_children())
    targets: dict[str, nn.Module] = dict(children)
    view = units(model)
    unit_modules = {id(p) for u in view.units for p in u.module.parameters()}
    stem = []
    for name, child in children.items():
        if any(id(p) in unit_modules for p in child.parameters()):
            break
        stem.append(child)
    targets["stem"] = nn.ModuleList(stem)
    targets.update({u.name: u.module for u in view.units})
    targets["head"] = getattr(net, head_attr(net))
    return targets


def freeze(model: nn.Module, spec: str) -> list[str]:
    """Freeze what ``spec`` names ('stem,layer1' or 'N'); returns the frozen names. Frozen
    BatchNorm layers are marked so :func:`keep_frozen_bn` holds them in eval mode."""
    net = getattr(model, "net", model)
    spec = str(spec).strip()
    if spec.isdigit():
        children = list(net.named_children())
        n = int(spec)
        if not 1 <= n <= len(children):
            raise FastablateError(f"--freeze {n}: {model.arch if hasattr(model, 'arch') else 'the model'} has "
                                  f"{len(children)} top-level children, so N must be in 1..{len(children)}")
        chosen = dict(children[:n])
    else:
        targets = freeze_targets(model)
        names = [s.strip() for s in spec.split(",")]
        unknown = [n for n in names if n not in targets]
        if unknown:
            raise FastablateError(f"--freeze {unknown[0]!r} names nothing in {getattr(model, 'arch', 'the model')}; "
                                  f"valid: {', '.join(targets)}")
        chosen = {n: targets[n] for n in names}
    for module in chosen.values():
        for p in module.parameters():
            p.requires_grad_(False)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.fastablate_frozen = True
    if not any(p.requires_grad for p in model.parameters()):
        raise FastablateError(f"--freeze {spec} freezes every parameter: nothing would train")
    return list(chosen)


def keep_frozen_bn(model: nn.Module) -> None:
    """Put frozen BatchNorm layers back into eval mode (call after ``model.train()``)."""
    for m in model.modules():
        if getattr(m, "fastablate_frozen", False):
            m.eval()


def imagenet_file(arch: str) -> tuple[Path, str]:
    """(path in the torch hub cache, download address) of torchvision's ImageNet weights."""
    import torchvision

    if arch not in IMAGENET:
        raise FastablateError(f"--init imagenet: no ImageNet weights for {arch}; torchvision has them for "
                              f"{', '.join(IMAGENET)}")
    url = getattr(torchvision.models, IMAGENET[arch]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def load_fitting(net: nn.Module, state: dict, source: str) -> list[str]:
    """Load the tensors of ``state`` whose name and shape fit ``net``; the others keep their
    initialization. Returns (and notes) the names left as initialized."""
    own = net.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    left = [k for k in own if k not in fits and not k.endswith("num_batches_tracked")]
    net.load_state_dict(fits, strict=False)
    if left:
        shown = ", ".join(left[:4]) + (f" (+{len(left) - 4} more)" if len(left) > 4 else "")
        note(f"{source}: {len(fits)} tensors loaded; {len(left)} keep their fresh initialization "
             f"(no tensor of that name and shape): {shown}")
    return left


def init_imagenet(model: nn.Module) -> Path:
    """Load torchvision's ImageNet weights for ``model.arch`` from the hub cache."""
    path, url = imagenet_file(model.arch)
    if not path.is_file():
        raise FastablateError(f"--init imagenet: {path} is missing; nothing is downloaded: put torchvision's "
                              f"ImageNet weights for {model.arch} there ({url}), or set TORCH_HOME")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FastablateError(f"--init imagenet: cannot read {path}: {str(e).splitlines()[0]}") from None
    load_fitting(model.net, state, f"ImageNet weights {path.name}")
    return path


def _head_keys(state: dict, prefixes=(*HEAD_ATTRS, "linear", "head")) -> list[str]:
    return [k for k in state if k.split(".", 1)[0] in prefixes]


def init_from_checkpoint(model: nn.Module, ckpt: dict, path: str) -> None:
    """Initialize ``model`` (built for the data at hand) from a checkpoint, ours or foreign:
    the body must fit (by name, or by position as :func:`load_state` allows); the head is
    loaded when it fits and the classes agree, and is left freshly initialized otherwise,
    with a note."""
    from fastablate.models.checkpoint import load_state

    net = model.net
    own = net.state_dict()
    head_own = _head_keys(own, (head_attr(net),))
    head_theirs = _head_keys(ckpt["state_dict"])
    body = {k: v for k, v in ckpt["state_dict"].items() if k not in head_theirs}
    body_net = _Without(net, head_attr(net))
    load_state(body_net, body, model.arch, path)
    theirs_classes = ckpt.get("classes")
    fits = [own[k].shape for k in head_own] == [ckpt["state_dict"][k].shape for k in head_theirs]
    if fits and (theirs_classes is None or list(theirs_classes) == list(model.classes or [])):
        net.load_state_dict(dict(zip(head_own, (ckpt["state_dict"][k] for k in head_theirs))), strict=False)
        return

    def names(classes) -> str:
        return ", ".join(map(str, list(classes)[:3])) + (", ..." if len(classes) > 3 else "")

    what = (f"its {len(theirs_classes)} classes ({names(theirs_classes)}) are not the {model.num_classes} here "
            f"({names(model.classes or [])})" if theirs_classes and fits else "its head does not fit the "
            f"{model.num_classes} classes here")
    note(f"checkpoint {path}: {what}; the head ({head_attr(net)}) is freshly initialized")


class _Without(nn.Module):
    """A view of ``net`` without its child ``attr`` (for loading a body)."""

    def __init__(self, net: nn.Module, attr: str):
        super().__init__()
        for name, child in net.named_children():
            if name != attr:
                self.add_module(name, child)
        for name, p in net.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in net.named_buffers(recurse=False):
            self.register_buffer(name, b)
