"""The options every model/data command shares (:class:`Setup`), and what the runner does
first with them: pick the device, load the data, build or load the models.

All bad input surfaces here, before a run directory is created.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from fastablate.data import ImageSet, build_dataset
from fastablate.engines.core.runtime import Runtime, check_finite
from fastablate.engines.core.spec import Choice, Float, Int, List, ModelFile, Spec, Text, option
from fastablate.engines.core.tracking import LOCAL_MLFLOW, Tracker, TrackingURI
from fastablate.errors import FastablateError, first_line
from fastablate.models import NormalizedModel, build_model
from fastablate.models.checkpoint import FORMAT, model_from_checkpoint, read_checkpoint
from fastablate.modes import eval_mode


@dataclass(frozen=True)
class Setup(Spec):
    """The shared model and data options."""

    model: Optional[str] = option(None, "Registry model name (fastablate models).", type=Text("NAME"))
    weights: Optional[str] = option(None, "Checkpoint: ours, or a foreign state_dict (then --model, --mean/--std).",
                                    type=Text("FILE"), role="input")
    dataset: str = option("digits", "Registry dataset (fastablate datasets).", type=Text("NAME"))
    data_dir: Optional[str] = option(None, "Root of the dataset on disk.", type=Text("DIR"))
    split: str = option("test", "Split to use.", type=Choice("train", "test"))
    limit: Optional[int] = option(None, "Seeded class-balanced subset of N examples.", type=Int(min=1))
    image_size: Optional[int] = option(None, "Input size in pixels: batches are resized to it (bilinear, antialiased) "
                                             "on the device [default: the checkpoint's, else the data's].",
                                       type=Int(min=8, max=1024))
    mean: Optional[tuple[float, ...]] = option(None, "Input normalization mean per channel, e.g. 0.49,0.48,0.45.",
                                               type=List(Float(-1e6, 1e6)))
    std: Optional[tuple[float, ...]] = option(None, "Input normalization std per channel.",
                                              type=List(Float(0, 1e6, min_open=True)))
    device: str = option("auto", "Device.", type=Choice("auto", "cpu", "cuda"))
    batch_size: int = option(128, "Images per batch.", type=Int(min=1, max=1 << 20))
    workers: int = option(0, "Loader processes for file-backed datasets.", type=Int(min=0, max=256))
    seed: int = option(0, "Seed of every random choice.", type=Int(min=0))
    out: Optional[str] = option(None, "Output directory [default: runs/<command>-<timestamp>].", type=Text("DIR"))
    force: bool = option(False, "Replace what --out holds (another run, other files) instead of refusing.")
    download: bool = option(False, "Let torchvision download CIFAR when absent.")
    tensorboard: bool = option(False, "Log to TensorBoard: event files in the run directory's tensorboard/ "
                                      "(scalars per epoch and step, the plots, the config as hparams).")
    mlflow: Optional[str] = option(None, "Log to MLflow at URI (a tracking server, or a local store; the flag "
                                         f"alone: {LOCAL_MLFLOW}): params, metrics per epoch, the run directory. "
                                         "Credentials: MLFLOW_TRACKING_USERNAME/PASSWORD; a user:password@ in the "
                                         "URI is moved there and never recorded.",
                                   type=TrackingURI(), flag_value=LOCAL_MLFLOW)
    compare: tuple[str, ...] = option((), "A checkpoint run through the same study on the same images and drawn "
                                          "on the same plots (repeatable); MODEL=FILE names the model of a "
                                          "foreign state_dict, e.g. resnet32=peer.th.", type=ModelFile(),
                                      multiple=True, role="input")

    def validate(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise FastablateError("--mean and --std go together: give both or neither")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise FastablateError(f"--mean has {len(self.mean)} values and --std {len(self.std)}: give one per channel")

    def tracker(self) -> Tracker:
        """The tracking backends the options ask for (checked now: an unreachable store fails here)."""
        return Tracker(self.tensorboard, self.mlflow)

    def runtime(self, progress: bool = False) -> Runtime:
        return Runtime(device=resolve_device(self.device), batch_size=self.batch_size, workers=self.workers,
                       seed=self.seed, progress=progress)


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


def load_data(setup: Setup, split: str | None = None, *, image_size: int | None = None,
              classes: list[str] | None = None, classes_of: str = "the model") -> ImageSet:
    """A split of ``--dataset`` (default ``--split``), its batches made ``--image-size`` (else
    ``image_size``, a checkpoint's) square and its labels matched by name to ``classes`` (see
    :func:`fastablate.data.build_dataset`)."""
    return build_dataset(setup.dataset, setup.data_dir, split or setup.split, limit=setup.limit, seed=setup.seed,
                         download=setup.download, image_size=setup.image_size or image_size, classes=classes,
                         classes_of=classes_of, asked=setup.image_size is not None)


def checkpoint_data(weights: str | None) -> dict:
    """What a checkpoint fixes about the data it is evaluated on: its image size and class
    names (our checkpoints carry them; a foreign one fixes nothing)."""
    if not weights:
        return {}
    ckpt = read_checkpoint(weights)
    if ckpt["format"] != FORMAT:
        return {}
    return {"image_size": ckpt["image_size"], "classes": ckpt.get("classes"),
            "classes_of": f"checkpoint {weights}"}


def load_or_build_model(setup: Setup, ds: ImageSet, *, weights: str | None = None,
                        default_arch: str | None = None) -> NormalizedModel:
    """The model of ``weights`` (default ``--weights``; our checkpoint or a foreign one), or a
    fresh ``--model``. Normalization: --mean/--std, else the checkpoint's, else the dataset's."""
    weights = weights if weights is not None else setup.weights
    arch = setup.model or default_arch
    seed_everything(setup.seed)  # the same seed gives the same initial weights
    if weights:
        mean, std = setup.mean, setup.std
        ckpt = read_checkpoint(weights)
        if mean is None and ckpt["format"] != FORMAT:
            print(f"note: {weights} carries no normalization; using {ds.name}'s statistics "
                  "(give --mean/--std to override)", file=sys.stderr)
            mean, std = ds.mean, ds.std
        model = model_from_checkpoint(ckpt, weights, arch, image_size=ds.image_size, mean=mean, std=std)
    else:
        if arch is None:
            raise FastablateError("no model: give --model NAME or --weights CHECKPOINT")
        model = build_model(arch, ds.num_classes, image_size=ds.image_size,
                            mean=setup.mean or ds.mean, std=setup.std or ds.std)
    if model.num_classes != ds.num_classes:
        raise FastablateError(f"model {model.arch} has {model.num_classes} outputs, dataset {ds.name} has "
                              f"{ds.num_classes} classes")
    if model.classes is None:
        model.classes = list(ds.classes)
    check_fits(model, ds)
    return model


def check_fits(model: NormalizedModel, ds: ImageSet) -> int:
    """The model takes the data's images: as many normalization values as channels, and a
    forward pass of one image works (a model too deep for the image size, or made for other
    inputs, fails here) and gives finite logits of shape (batch, classes), before anything is
    written (the studies check every batch again). Returns its number of outputs."""
    sample = ds.floats(torch.arange(1))
    if model.mean.numel() != sample.shape[1]:
        raise FastablateError(f"--mean/--std have {model.mean.numel()} values, the images have {sample.shape[1]} "
                              "channels")
    sample = sample.to(next(model.parameters()).device)
    try:
        with eval_mode(model), torch.no_grad():
            logits = model(sample)
    except Exception as e:  # a user's model raises what it raises
        raise FastablateError(f"model {model.arch} cannot take {ds.image_size}x{ds.image_size} images of "
                              f"{sample.shape[1]} channels: {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = f" of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else ""
        raise FastablateError(f"model {model.arch} returns a {type(logits).__name__}{shape}; the studies need "
                              "logits of shape (batch, classes)")
    with eval_mode(model):
        check_finite(model, logits, sample)
    return logits.shape[1]


def load_checkpoints(setup: Setup, ds: ImageSet, runtime: Runtime, *, command: str) -> list[NormalizedModel]:
    """``--weights`` and each ``--compare`` checkpoint, on the runtime's device. A compare
    model of the same architecture is named after its file too."""
    if not setup.weights:
        raise FastablateError(f"{command} needs --weights CHECKPOINT")
    first = load_or_build_model(setup, ds).to(runtime.device)
    models = [first]
    for entry in setup.compare:
        arch, path = ModelFile.split(entry)
        try:
            other = load_or_build_model(replace(setup, model=arch), ds, weights=path)
        except FastablateError:
            if arch is None and read_checkpoint(path)["format"] != FORMAT:
                raise FastablateError(f"--compare {path} is a bare state_dict: name its model as MODEL=FILE, e.g. "
                                      f"--compare {first.arch}={path}") from None
            raise
        if other.classes != first.classes:
            raise FastablateError(f"--compare {path} has classes {', '.join(other.classes[:5])} ...; --weights "
                                  f"{setup.weights} has {', '.join(first.classes[:5])} ...: compare models of one "
                                  "task")
        if other.image_size != first.image_size:
            raise FastablateError(f"--compare {path} takes {other.image_size}x{other.image_size} images, --weights "
                                  f"{setup.weights} {first.image_size}x{first.image_size}")
        if other.name in [m.name for m in models]:
            other.name = f"{other.arch} ({Path(path).name})"
        models.append(other.to(runtime.device))
    return models
