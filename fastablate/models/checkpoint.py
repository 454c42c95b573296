"""Checkpoints: ours (atomic, weights_only-loadable) and foreign state_dict files.

Ours is a dict of tensors and plain Python types::

    {"format": "fastablate", "version": 1, "arch": "resnet20", "num_classes": 10,
     "image_size": 32, "mean": [...], "std": [...], "classes": ["airplane", ...],
     "state_dict": {...}, "meta": {...}}

Reading one checks it as options are checked: the keys are there with their types and in
their ranges (``image_size`` 8..1024, ``num_classes`` 1..100,000, a dropout in [0, 1), one
class name per output), every weight is finite, every std is positive, and every BatchNorm
``running_var`` is non-negative (a negative variance makes every output NaN).

Foreign files are a raw state_dict, ``{"state_dict": ...}`` or ``{"model": ...}``, with or
without DataParallel's ``module.`` prefix; they need ``arch`` and the normalization.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Sequence

import torch

from fastablate.errors import FastablateError, note
from fastablate.files import atomic_save

FORMAT = "fastablate"
VERSION = 2  # 2: "head" is the explicit layer list and "dropout_after" where --dropout went in the body


def save_checkpoint(model, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write ``model`` (a NormalizedModel) in our format, atomically."""
    atomic_save({
        "format": FORMAT, "version": VERSION, "arch": model.arch, "num_classes": model.num_classes,
        "image_size": model.image_size, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
        "classes": list(model.classes) if model.classes is not None else None,
        "head": model.head, "dropout": model.dropout, "dropout_after": list(getattr(model, "dropout_after", ())),
        "stochastic_depth": model.stochastic_depth,
        **({"stem": model.stem} if getattr(model, "stem", None) else {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.net.state_dict().items()}, "meta": meta or {},
    }, path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path`` as our dict, checked; foreign files come back with ``arch``
    None. Reading the same unchanged file again returns the same dict (do not modify it)."""
    path = Path(path)
    if not path.is_file():
        raise FastablateError(f"checkpoint {str(path)!r} does not exist" if not path.exists() else
                              f"checkpoint {str(path)!r} is not a file")
    st = path.stat()
    return _read(str(path.resolve()), st.st_mtime_ns, st.st_size, str(path))


@functools.lru_cache(maxsize=8)
def _read(resolved: str, mtime_ns: int, size: int, shown: str) -> dict:
    if size == 0:
        raise FastablateError(f"cannot read checkpoint {shown!r}: the file is empty")
    try:
        obj = torch.load(resolved, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, text, non-tensor payloads
        reason = str(e).splitlines()[0] if str(e) else repr(e)
        raise FastablateError(f"cannot read checkpoint {shown!r}: {reason}") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        _check_ours(obj, shown)
        state = obj["state_dict"]
    else:
        state = obj
        if isinstance(obj, dict):
            for key in ("state_dict", "model"):
                if isinstance(obj.get(key), dict):
                    state = obj[key]
                    break
        if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise FastablateError(f"checkpoint {shown!r} holds no state_dict (expected a dict of tensors, "
                                  "or one under 'state_dict' or 'model')")
        if all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        obj = {"format": "foreign", "arch": None, "state_dict": state, "meta": {}}
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise FastablateError(f"checkpoint {shown!r}: {k} holds NaN or infinite values")
        if k.endswith("running_var") and v.numel() and float(v.min()) < 0:
            raise FastablateError(f"checkpoint {shown!r}: {k} holds a negative variance ({float(v.min()):.4g}); "
                                  "BatchNorm statistics are never negative")
    return obj


_OURS = {"arch": str, "num_classes": int, "image_size": int, "mean": list, "std": list, "state_dict": dict}


def _check_ours(obj: dict, shown: str) -> None:
    missing = [k for k, t in _OURS.items() if not isinstance(obj.get(k), t)]
    if missing:
        raise FastablateError(f"checkpoint {shown!r} lacks {', '.join(missing)} (or they have the wrong type); "
                              f"a fastablate checkpoint holds {', '.join(_OURS)}")
    if not all(isinstance(v, torch.Tensor) for v in obj["state_dict"].values()):
        raise FastablateError(f"checkpoint {shown!r}: its state_dict holds values that are not tensors")
    def bad(field, value, want):
        return FastablateError(f"checkpoint {shown!r}: {field} is {value!r}; {want}")
    if isinstance(obj["image_size"], bool) or not 8 <= obj["image_size"] <= 1024:
        raise bad("image_size", obj["image_size"], "expected 8..1024 pixels")
    if isinstance(obj["num_classes"], bool) or not 1 <= obj["num_classes"] <= 100_000:
        raise bad("num_classes", obj["num_classes"], "expected 1..100000")
    if not obj["arch"].strip():
        raise bad("arch", obj["arch"], "expected a model name")
    stds = obj["std"]
    if not 1 <= len(stds) <= 4 or len(stds) != len(obj["mean"]) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in stds + obj["mean"]) \
            or min(stds) <= 0:
        raise FastablateError(f"checkpoint {shown!r}: its normalization mean {obj['mean']} / std {stds} is not "
                              "1 to 4 finite numbers each, with positive stds")
    classes = obj.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) != obj["num_classes"]
                                or not all(isinstance(c, str) for c in classes)):
        raise FastablateError(f"checkpoint {shown!r}: classes are not {obj['num_classes']} names, one per output")
    head, dropout = obj.get("head", "linear"), obj.get("dropout", 0.0)
    if not isinstance(head, str):
        raise bad("head", head, "expected a head spec such as linear or mlp:512")
    after = obj.get("dropout_after", [])
    if not isinstance(after, list) or not all(isinstance(n, str) for n in after):
        raise bad("dropout_after", after, "expected a list of module names")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise bad("dropout", dropout, "expected a probability in [0, 1)")
    if obj.get("stem", "cifar") not in ("cifar", "imagenet"):
        raise bad("stem", obj["stem"], "expected cifar or imagenet")
    survival = obj.get("stochastic_depth", 1.0)
    if isinstance(survival, bool) or not isinstance(survival, (int, float)) or not 0 < survival <= 1:
        raise bad("stochastic_depth", survival, "expected a survival probability in (0, 1]")


def _counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_state(net: torch.nn.Module, state: dict, arch: str, path) -> None:
    """Load ``state`` into ``net`` exactly. BatchNorm counters (``num_batches_tracked``) may be
    missing: files saved before PyTorch 0.4.1 have none. Keys that differ only in their names,
    with the ordered list of shapes matching one to one (``linear`` for ``fc`` in common CIFAR
    ResNet files), load by position with one note; anything else is one error line."""
    own = {k: v for k, v in net.state_dict().items() if not _counter(k)}
    theirs = {k: v for k, v in state.items() if not _counter(k)}
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    if (missing or unexpected) and len(own) == len(theirs) and all(
            a.shape == b.shape for a, b in zip(own.values(), theirs.values())):
        renamed = [(a, b) for a, b in zip(theirs, own) if a != b]
        shown = ", ".join(f"{a} -> {b}" for a, b in renamed[:4]) + (f" (+{len(renamed) - 4} more)"
                                                                      if len(renamed) > 4 else "")
        note(f"checkpoint {str(path)} names {len(renamed)} tensors differently from {arch}; loaded by position: "
             f"{shown}")
        theirs = dict(zip(own, theirs.values()))
        missing = unexpected = []
    if missing or unexpected:
        def few(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        parts = ([f"missing keys {few(missing)}"] if missing else []) + (
            [f"unexpected keys {few(unexpected)}"] if unexpected else [])
        raise FastablateError(f"checkpoint {str(path)!r} does not fit model {arch}: {'; '.join(parts)}")
    for k, v in theirs.items():
        if own[k].shape != v.shape:
            raise FastablateError(f"checkpoint {str(path)!r} does not fit model {arch}: {k} has shape "
                                  f"{tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model")
    counters = {k: v for k, v in state.items() if _counter(k) and k in net.state_dict()}
    net.load_state_dict({**theirs, **counters}, strict=False)


def load_model(path: str | os.PathLike, arch: str | None = None, *, num_classes: int | None = None,
               image_size: int | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None):
    """A NormalizedModel with the weights at ``path``.

    Our checkpoints carry arch, classes and normalization (``arch``, when given, must agree).
    Foreign files need ``arch``; ``num_classes`` defaults to the rows of the last linear
    weight, and ``mean``/``std`` must be given.
    """
    return model_from_checkpoint(read_checkpoint(path), path, arch, num_classes=num_classes,
                                 image_size=image_size, mean=mean, std=std)


def checkpoint_arch(ckpt: dict, path: str | os.PathLike, arch: str | None = None) -> str | None:
    """The model to build for checkpoint ``ckpt``: ``arch`` when the user names one, else the one
    the checkpoint records, which may be a registry model or ``timm:NAME`` only. A checkpoint never
    runs code: a model made by a user's factory is rebuilt when the user names that factory."""
    from fastablate.models import runs_code

    saved = ckpt.get("arch")
    if arch is None and saved is not None and runs_code(saved):
        raise FastablateError(f"checkpoint {str(path)!r} was saved from the model factory {saved}; a checkpoint "
                              f"never runs code: name the factory to rebuild it, --model {saved} (or where that "
                              "file is now)")
    return arch or saved


def model_from_checkpoint(ckpt: dict, path: str | os.PathLike, arch: str | None = None, *,
                          num_classes: int | None = None, image_size: int | None = None,
                          mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """:func:`load_model` for a checkpoint already read with :func:`read_checkpoint`."""
    from fastablate.models import build_model, default_stem, get_spec, is_external

    stem = None
    if ckpt["format"] == FORMAT:
        if arch is not None and arch != ckpt["arch"] and not (is_external(arch) and is_external(ckpt["arch"])):
            raise FastablateError(f"checkpoint {str(path)!r} holds model {ckpt['arch']}, not {arch}")
        if arch is not None and arch != ckpt["arch"]:
            note(f"checkpoint {str(path)} was saved from {ckpt['arch']}; loading it into {arch}")
        arch = checkpoint_arch(ckpt, path, arch)
        num_classes = ckpt["num_classes"]
        if not is_external(arch) and get_spec(arch).stems:  # the stem it was trained with, whatever size it sees
            stem = ckpt.get("stem") or default_stem(ckpt["image_size"])
        image_size = image_size or ckpt["image_size"]
        mean = mean if mean is not None else ckpt["mean"]
        std = std if std is not None else ckpt["std"]
    else:
        if arch is None:
            raise FastablateError(f"checkpoint {str(path)!r} is a bare state_dict: name its model with --model")
        if mean is None or std is None:
            raise FastablateError(f"checkpoint {str(path)!r} carries no normalization: give --mean and --std")
        if num_classes is None and not is_external(arch):  # an external model's outputs say it
            weights = [v for k, v in ckpt["state_dict"].items() if k.endswith("weight") and v.dim() == 2]
            num_classes = weights[-1].shape[0] if weights else 10
    head, dropout, after = ckpt.get("head", "linear"), ckpt.get("dropout", 0.0), ckpt.get("dropout_after")
    if ckpt.get("version", 1) < 2 and dropout > 0 and head.startswith("mlp:"):  # version 1: a dropout before
        head = ",".join(f"dropout:{dropout:g},linear:{w},relu" for w in head[4:].split(",")) + \
            f",dropout:{dropout:g},linear"                                       # every linear layer
        after = []
    try:
        model = build_model(arch, num_classes, image_size=image_size or 32, mean=mean, std=std, head=head,
                            dropout=dropout, stochastic_depth=ckpt.get("stochastic_depth", 1.0), stem=stem,
                            dropout_after=None if after is None else after)
    except FastablateError as e:
        if not (is_external(arch) and arch == ckpt["arch"]):
            raise
        raise FastablateError(f"checkpoint {str(path)!r} was saved from model {arch}: {e}; if its file moved, give "
                              "--model NEWPATH:FACTORY") from None
    load_state(model.net, ckpt["state_dict"], arch, path)
    model.meta = ckpt.get("meta") or {}
    model.classes = ckpt.get("classes")
    return model
