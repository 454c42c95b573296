"""Transfer learning: heads, freezing, ImageNet initialization, loading what fits.

- Heads: ``linear`` (the model's own), ``mlp:512,256`` (hidden widths, ReLU after each), or
  the layers as written (``linear:128,relu,dropout:0.3,linear``; :func:`parse_head`). The
  head is the net's ``fc`` (ResNets) or ``classifier`` (VGGs); checkpoints record its
  explicit spec so they rebuild it. Dropout also goes after body modules (:func:`dropout_after`).
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
import torch.nn.functional as F
from torch import Tensor, nn

from fastablate.errors import FastablateError, note

TIMM = "timm:"  # the prefix of a timm model's spec (fastablate.models.external)
HEAD_ATTRS = ("fc", "classifier")
# Registry name -> torchvision weights enum with IMAGENET1K_V1.
IMAGENET = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
            **{f"vgg{d}{bn}": f"VGG{d}{bn.upper()}_Weights" for d in (11, 13, 16, 19) for bn in ("", "_bn")}}


HEAD_FORM = "linear | mlp:W,.. | linear:W,relu,dropout:P,...,linear"


def parse_head(text: str, dropout: float = 0.0) -> tuple[tuple[str, float | None], ...]:
    """The layers a head spec builds, as (kind, value) pairs; a ValueError names the problem.

    - ``linear``: one linear layer to the classes, after a dropout of ``dropout`` when > 0;
    - ``mlp:128,64``: shorthand for ``linear:128,relu,linear:64,relu,linear``, with a
      ``dropout:P`` after each ReLU when ``dropout`` is P > 0;
    - a list of ``linear:W`` (a linear layer to W features), ``relu``, ``dropout:P``, ending in
      ``linear`` (to the classes), exactly as written: ``linear:128,relu,dropout:0.3,linear``.
    """
    text = str(text).strip()
    if text == "linear":
        return ((("dropout", dropout),) if dropout > 0 else ()) + (("linear", None),)
    if text.startswith("mlp:"):
        try:
            widths = [int(w) for w in text[4:].split(",")]
        except ValueError:
            raise ValueError(f"has widths {text[4:]!r} that are not whole numbers") from None
        hidden = [item for w in widths for item in
                  (("linear", float(w)), ("relu", None), *((("dropout", dropout),) if dropout > 0 else ()))]
        return _checked((*hidden, ("linear", None)))
    if dropout > 0:
        raise ValueError("is a list of layers, which says where its dropout goes: give dropout:P in it, not --dropout")
    layers = []
    for item in text.split(","):
        kind, _, value = item.strip().partition(":")
        if kind not in ("linear", "relu", "dropout") or (kind == "relu" and value) or (kind == "dropout" and not value):
            raise ValueError(f"has {item.strip()!r}, which is not a layer; use {HEAD_FORM}")
        try:
            layers.append((kind, float(value) if value else None))
        except ValueError:
            raise ValueError(f"has {item.strip()!r}, whose value is not a number") from None
    return _checked(tuple(layers))


def _checked(layers: tuple) -> tuple:
    if not layers or layers[-1][0] != "linear":
        raise ValueError("does not end in a linear layer to the classes (linear or linear:CLASSES)")
    for i, (kind, value) in enumerate(layers):
        if kind == "linear" and value is None and i < len(layers) - 1:
            raise ValueError("has a linear layer without a width before the last; give linear:W")
        if kind == "linear" and value is not None and (value != int(value) or not 1 <= value <= 1 << 16):
            raise ValueError(f"has linear:{value:g}; a width is a whole number in 1..65536")
        if kind == "dropout" and not 0 <= value < 1:
            raise ValueError(f"has dropout:{value:g}; a dropout probability is in [0, 1)")
    return layers


def head_spec(layers: tuple) -> str:
    """The explicit spec of parsed head layers (what checkpoints record)."""
    return ",".join(k if v is None else f"{k}:{v:g}" for k, v in layers)


def head_attr(net: nn.Module) -> str:
    for attr in HEAD_ATTRS:
        if isinstance(getattr(net, attr, None), nn.Module):
            return attr
    raise FastablateError(f"{type(net).__name__} has no head ({' or '.join(HEAD_ATTRS)}) to replace")


def _in_features(head: nn.Module) -> int:
    first = head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))
    return first.in_features


def set_head(net: nn.Module, num_classes: int, layers: tuple) -> None:
    """Replace the net's head by the layers of :func:`parse_head`, from its input width to the
    classes."""
    attr = head_attr(net)
    width = _in_features(getattr(net, attr))
    last = layers[-1][1]
    if last is not None and int(last) != num_classes:
        raise FastablateError(f"--head {head_spec(layers)!r} ends in linear:{int(last)}, but the model has "
                              f"{num_classes} classes")
    built: list[nn.Module] = []
    for i, (kind, value) in enumerate(layers):
        if kind == "linear":
            out = num_classes if i == len(layers) - 1 else int(value if value is not None else num_classes)
            built.append(nn.Linear(width, out))
            width = out
        elif kind == "relu":
            built.append(nn.ReLU(inplace=True))
        else:
            built.append(nn.Dropout(value))
    setattr(net, attr, built[0] if len(built) == 1 else nn.Sequential(*built))


class _Dropout:
    """A forward hook: dropout of ``p`` on the module's output while training."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        return F.dropout(output, self.p, module.training)


def dropout_after(model: nn.Module, names: Sequence[str], p: float) -> None:
    """Dropout of ``p`` on the outputs of the named body modules (top-level children or units)
    while training, as forward hooks: the weights' names stay those of the model."""
    targets = {n: m for n, m in freeze_targets(model).items() if n not in ("stem", "head")}
    for name in names:
        if name not in targets:
            raise FastablateError(f"--dropout-after {name!r} names nothing in {getattr(model, 'arch', 'the model')}; "
                                  f"valid: head, {', '.join(targets)}")
        targets[name].register_forward_hook(_Dropout(p))


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


def imagenet_weights(arch: str) -> Path:
    """The file ``--init imagenet`` reads for ``arch`` (torchvision's in the torch hub cache, timm's
    in the Hugging Face cache); nothing is downloaded: an absent file is an error naming where it
    goes, raised before anything runs."""
    if arch.startswith(TIMM):
        return _timm_weights(arch)
    path, url = imagenet_file(arch)
    if not path.is_file():
        raise FastablateError(f"--init imagenet: {path} is missing; nothing is downloaded: put torchvision's "
                              f"ImageNet weights for {arch} there ({url}), or set TORCH_HOME")
    return path


def _timm_weights(arch: str) -> Path:
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    name = arch[len(TIMM):].split(",")[0]
    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        raise FastablateError(f"--init imagenet: timm has no pretrained weights on the Hugging Face hub for {name}")
    found = try_to_load_from_cache(repo, "model.safetensors")
    if not isinstance(found, str):
        where = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots" / "<revision>"
        raise FastablateError(f"--init imagenet: {where / 'model.safetensors'} is missing; nothing is downloaded: "
                              f"fetch {repo} into the Hugging Face cache (or set HF_HUB_CACHE)")
    return Path(found)


def timm_pretrained(arch: str) -> tuple[dict, Path]:
    """The state_dict of timm's pretrained weights for ``timm:NAME`` from the Hugging Face cache
    (``$HF_HUB_CACHE``), and its file (:func:`imagenet_weights`)."""
    from safetensors.torch import load_file

    found = _timm_weights(arch)
    try:
        return load_file(found), found
    except Exception as e:
        raise FastablateError(f"--init imagenet: cannot read {found}: {str(e).splitlines()[0]}") from None


def init_imagenet(model: nn.Module) -> Path:
    """Load torchvision's ImageNet weights for ``model.arch`` from the hub cache (a timm model:
    timm's pretrained weights from the Hugging Face cache)."""
    if model.arch.startswith(TIMM):
        state, path = timm_pretrained(model.arch)
        load_fitting(model.net, state, f"timm weights {path.name}")
        return path
    path = imagenet_weights(model.arch)
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

    if theirs_classes and fits:
        what = (f"its {len(theirs_classes)} classes ({names(theirs_classes)}) are not the {model.num_classes} here "
                f"({names(model.classes or [])})")
    elif theirs_classes and list(theirs_classes) == list(model.classes or []):
        what = f"its head is not the one built here ({getattr(model, 'head', 'linear')})"
    else:
        what = f"its head does not fit the {model.num_classes} classes here"
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
