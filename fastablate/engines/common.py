"""What every engine does first: pick the device, load the data, build or load the model.

All bad input surfaces here, before a run directory is created.
"""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

import torch

from fastablate.config import CommonConfig
from fastablate.data import ImageSet, build_dataset
from fastablate.errors import FastablateError
from fastablate.models import NormalizedModel, build_model
from fastablate.models.checkpoint import FORMAT, model_from_checkpoint, read_checkpoint

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from (model init, dropout, data order)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FastablateError("--device cuda, but no CUDA device is available (torch.cuda.is_available() is False)")
    if name not in ("cpu", "cuda"):
        raise FastablateError(f"unknown device {name!r}; choose from: auto, cpu, cuda")
    return torch.device(name)


def load_data(cfg: CommonConfig, split: str | None = None, image_size: int | None = None) -> ImageSet:
    return build_dataset(cfg.dataset, cfg.data_dir, split or cfg.split, limit=cfg.limit, seed=cfg.seed,
                         download=cfg.download, image_size=image_size)


def load_or_build_model(cfg: CommonConfig, ds: ImageSet, *, default_arch: str | None = None) -> NormalizedModel:
    """The model of ``cfg.weights`` (our checkpoint or a foreign one), or a fresh ``cfg.model``.

    Normalization: --mean/--std, else the checkpoint's, else the dataset's statistics.
    """
    arch = cfg.model or default_arch
    seed_everything(cfg.seed)  # the same seed gives the same initial weights
    if cfg.weights:
        mean, std = cfg.mean, cfg.std
        ckpt = read_checkpoint(cfg.weights)
        if mean is None and ckpt["format"] != FORMAT:
            print(f"note: {cfg.weights} carries no normalization; using {ds.name}'s statistics "
                  "(give --mean/--std to override)", file=sys.stderr)
            mean, std = ds.mean, ds.std
        model = model_from_checkpoint(ckpt, cfg.weights, arch, image_size=ds.image_size, mean=mean, std=std)
    else:
        if arch is None:
            raise FastablateError("no model: give --model NAME or --weights CHECKPOINT")
        model = build_model(arch, ds.num_classes, image_size=ds.image_size,
                            mean=cfg.mean or ds.mean, std=cfg.std or ds.std)
    if model.num_classes != ds.num_classes:
        raise FastablateError(f"model {model.arch} has {model.num_classes} outputs, dataset {ds.name} has "
                              f"{ds.num_classes} classes")
    channels = ds.load(torch.arange(1)).shape[1]
    if model.mean.numel() != channels:
        raise FastablateError(f"--mean/--std have {model.mean.numel()} values, the images have {channels} channels")
    return model


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "", leave: bool = False) -> Iterable[T]:
    """A progress bar on stderr when it is a terminal; the items unchanged otherwise."""
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, leave=leave, disable=None, dynamic_ncols=True)
