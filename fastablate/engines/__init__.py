"""Engines: one module per study, each a :class:`~fastablate.engines.core.protocol.Study` with
a spec of its options, registered here under the CLI command that runs it.

The registry is import-light (no torch): built-in studies are listed below by import
path, so ``fastablate --help`` lists commands without importing any engine, and a command
imports only its own studies. A study of a user's registers its instance::

    from fastablate.engines import register_study
    register_study(MyStudy())          # then `fastablate <MyStudy.command> ...` runs it
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from fastablate.errors import FastablateError


@dataclass(frozen=True)
class Entry:
    name: str  # the study: "lesion"
    command: str  # the CLI command that runs it: "eval"
    summary: str  # one line for listings
    target: Any  # a Study instance, or "module:attribute" of a built-in one, imported on first use


_ENTRIES: dict[str, Entry] = {}

# Built-in studies, in the order their command chooses among them (a study with triggers
# first; the command's default study, with none, last).
BUILTIN = [
    ("train", "train", "Train a model and evaluate it after every epoch",
     "fastablate.engines.studies.train:TrainStudy"),
    ("lesion", "eval", "Lesion study (--lesion): units deleted or reordered at test time",
     "fastablate.engines.studies.lesion:LesionStudy"),
    ("noise", "eval", "Noise study (--noise-sigma, --input-noise): Gaussian noise on conv outputs or images",
     "fastablate.engines.studies.noise:NoiseStudy"),
    ("evaluate", "eval", "Evaluate a checkpoint: accuracy, loss, per-class accuracy, confusion matrix",
     "fastablate.engines.studies.evaluate:EvaluateStudy"),
    ("attack", "attack", "Attack a checkpoint: sparse pixels (L0; also black-box), optimized noise (L2), FGSM or PGD",
     "fastablate.engines.studies.attacks:AttackStudy"),
    ("paths", "paths", "Veit's paths: path-length distribution, gradient per path length, effective paths",
     "fastablate.engines.studies.paths:PathsStudy"),
    ("features", "features", "Feature maps: per-layer heatmaps, channel grids, dead channels; clean vs adversarial",
     "fastablate.engines.studies.features:FeaturesStudy"),
]


def register_study(study: Any, *, summary: str | None = None) -> None:
    """Register a study instance under its ``name`` and ``command`` (replacing one of that name)."""
    doc = (type(study).__doc__ or study.name).strip().splitlines()[0]
    _ENTRIES[study.name] = Entry(study.name, study.command, summary or doc, study)


def unregister_study(name: str) -> None:
    """Remove the study registered as ``name``."""
    _ENTRIES.pop(name, None)


def _register_builtin(name: str, command: str, summary: str, target: str) -> None:
    if name not in _ENTRIES:
        _ENTRIES[name] = Entry(name, command, summary, target)


for _args in BUILTIN:
    _register_builtin(*_args)


def commands() -> dict[str, list[Entry]]:
    """Command name -> its study entries, in registration order."""
    out: dict[str, list[Entry]] = {}
    for e in _ENTRIES.values():
        out.setdefault(e.command, []).append(e)
    return out


def get_study(name: str):
    """The study instance registered as ``name`` (importing a built-in one's module)."""
    if name not in _ENTRIES:
        raise FastablateError(f"unknown study {name!r}; choose from: {', '.join(_ENTRIES)}")
    entry = _ENTRIES[name]
    if isinstance(entry.target, str):
        module, attr = entry.target.split(":")
        study = getattr(importlib.import_module(module), attr)()
        _ENTRIES[name] = Entry(entry.name, entry.command, entry.summary, study)
        return study
    return entry.target


def command_studies(command: str) -> list:
    """The study instances of ``command``: triggered studies first, the default study last."""
    studies = [get_study(e.name) for e in commands().get(command, [])]
    return sorted(studies, key=lambda s: not s.triggers)
