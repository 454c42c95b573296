"""The study protocol: what every study is, what it is given, what it returns.

A study is a :class:`Study` subclass with a spec (its options, defaults and validation:
:mod:`fastablate.engines.core.spec`) and a ``run(model, data, spec, runtime)`` that returns a
:class:`Result`. The runner (:mod:`fastablate.engines.core.runner`) loads the data and the
models, runs the study on a model and on its ``--compare`` models over the same images,
and writes the run directory; the CLI makes the study's command from its spec; the library
functions (:mod:`fastablate.api`) run it on a model object.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence

from torch import nn

from fastablate.data import ImageSet
from fastablate.engines.core.runtime import Runtime, table
from fastablate.engines.core.spec import Spec


class Result(Protocol):
    """What a study's run returns; a ``warnings`` list of lines, where a result has one, goes
    into run.json."""

    model: str

    def to_dict(self) -> dict:
        """The model's part of results.json."""

    def rows(self) -> list[dict]:
        """Its rows of results.csv."""

    def plot(self, directory: Path, *others: "Result") -> list[Path]:
        """Draw this result, and the ``--compare`` models' results on the same figures, into ``directory``."""


class Study:
    """Base of every study. Subclasses set the class attributes and ``run``; the defaults of
    the other methods serve a study of trained checkpoints on one split of a dataset."""

    name: ClassVar[str]  # "lesion"
    command: ClassVar[str]  # the CLI command that runs it: "eval"
    spec_class: ClassVar[type[Spec]]
    triggers: ClassVar[tuple[str, ...]] = ()  # spec fields whose being given selects this study within its command
    setup_excludes: ClassVar[tuple[str, ...]] = ()  # shared options that do not apply ("compare", "split", ...)
    # Shared options whose default differs for this study ({"split": "train"}): the command
    # applies them to the options not given (and shows them in --help).
    setup_defaults: ClassVar[dict[str, Any]] = {}

    def load_data(self, setup, spec: Spec, runtime: Runtime) -> Any:
        """The data ``run`` gets: by default the ``--split`` of the dataset, at the image size
        and with the class names of the ``--weights`` checkpoint, made ready by :meth:`prepare`."""
        from fastablate.engines.core.setup import checkpoint_data, load_data

        return self.prepare(load_data(setup, **checkpoint_data(setup.weights)), spec, runtime.seed)

    def prepare(self, ds: ImageSet, spec: Spec, seed: int) -> Any:
        """The data ``run`` gets from the images ``ds`` (from the CLI's dataset or a library
        call's data): by default ``ds`` itself."""
        return ds

    def load_models(self, setup, spec: Spec, data: Any, runtime: Runtime) -> list[nn.Module]:
        """The models: by default ``--weights`` and each ``--compare`` checkpoint, on the device."""
        from fastablate.engines.core.setup import load_checkpoints

        return load_checkpoints(setup, data, runtime, command=self.command)

    def check(self, models: Sequence[nn.Module], data: Any, spec: Spec) -> None:
        """Checks that need the models or the data; all bad input fails here, before anything is written."""

    def run(self, model: nn.Module, data: Any, spec: Spec, runtime: Runtime) -> Result:
        raise NotImplementedError

    def run_info(self, models: Sequence[nn.Module], data: Any, spec: Spec) -> dict:
        """What run.json records beyond the options (e.g. what a training froze)."""
        return {}

    def resumes(self, spec: Spec) -> bool:
        """Whether this run continues the one in its ``--out``."""
        return False

    def document(self, results: Sequence[Result], spec: Spec) -> dict:
        """results.json: the first model's result, and the ``--compare`` models' under ``compare``
        (one dict for one model, a list for several)."""
        out = results[0].to_dict()
        if len(results) == 2:
            out["compare"] = results[1].to_dict()
        elif len(results) > 2:
            out["compare"] = [r.to_dict() for r in results[1:]]
        return out

    def write_artifacts(self, results: Sequence[Result], spec: Spec, runtime: Runtime) -> None:
        """Files beside results.json that a run keeps (adversarial.pt ...), into ``runtime.out``
        (``runtime.with_(suffix=...)`` per compared model is the study's business)."""

    def report(self, results: Sequence[Result], spec: Spec) -> str:
        """What the terminal shows at the end: by default a table of the rows."""
        return table([row for r in results for row in r.rows()])

    def metrics(self, document: dict) -> dict[str, float]:
        """The headline numbers of a results.json (what a sweep tabulates and plots): by default
        its top-level ``accuracy`` and ``loss``."""
        return {k: document[k] for k in ("accuracy", "loss") if isinstance(document.get(k), (int, float))}
