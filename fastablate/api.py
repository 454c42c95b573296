"""Every study as a Python function: a model object and data in, a result out, nothing
written unless asked (``save(dir)`` or ``out=``).

    import fastablate as fa
    res = fa.lesion(model, loader, plans=["all-single", "k-random"], k=[1, 2], samples=10)
    res.to_dict(); res.rows(); figs = res.plot(); res.save("runs/my-lesion")

``model`` is any ``nn.Module`` the unit view sees (a registry model, a torchvision ResNet or
VGG, a class with a registered adapter); it comes back in the train/eval mode and on the
device it came in with, and no ``.grad`` is left on it. ``data`` is what
:func:`fastablate.data.inputs.image_set` takes: an ``(x, y)`` pair, a Dataset, a DataLoader,
or a registry name with ``data_dir``; images in [0, 1], normalization as ``mean=``/``std=``
or part of the model. Options are the study's spec fields, by field name (``plans``, ``ks``)
or by flag name (``lesion``, ``k``), checked by the same spec as the CLI's flags (a bad value
is a :class:`~fastablate.errors.FastablateError`, a ``ValueError``, with the CLI's message).
``compare=[other, ...]`` runs the same study on other models over the same images, as
``--compare`` does. The CLI runs the same computation
(:func:`fastablate.engines.core.runner.execute`) and writes the same run directory.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from fastablate.data import to_unit
from fastablate.data.inputs import image_set
from fastablate.engines import get_study
from fastablate.engines.core.runner import execute, run_config, write_outputs
from fastablate.engines.core.runtime import Runtime, model_name
from fastablate.engines.core.setup import Setup, check_fits, resolve_device
from fastablate.engines.core.spec import parse_value, spec_options
from fastablate.errors import FastablateError
from fastablate.models import NormalizedModel
from fastablate.modes import eval_mode
from fastablate.plots import Figures
from fastablate.rundir import RunDir


class StudyResult:
    """A study's results on a model (and its ``compare`` models): what the CLI's run holds.

    ``to_dict()`` is results.json, ``rows()`` results.csv, ``plot()`` the figures of plots/
    (matplotlib Figures, shown inline in Jupyter), ``save(dir)`` the whole run directory.
    ``results`` holds the engine's result per model; attributes of the first model's result
    read through (``res.intact``, ``res.variants`` of a lesion study).
    """

    def __init__(self, study, spec, results: list, config: dict, device: torch.device, seed: int):
        self.study, self.spec, self.results = study, spec, results
        self._config, self._device, self._seed = config, device, seed

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("study", "spec", "results"):
            raise AttributeError(name)
        return getattr(self.results[0], name)

    def to_dict(self) -> dict:
        return self.study.document(self.results, self.spec)

    def rows(self) -> list[dict]:
        return [row for r in self.results for row in r.rows()]

    def report(self) -> str:
        """The table the CLI prints."""
        return self.study.report(self.results, self.spec)

    def __repr__(self) -> str:
        return self.report()

    def plot(self) -> list:
        """The figures the run directory's plots/ would hold, as matplotlib Figures (in that order)."""
        sink = Figures()
        self.results[0].plot(sink, *self.results[1:])
        return sink.figures

    def save(self, directory: str | Path, *, force: bool = False) -> Path:
        """Write the run directory the CLI writes (run.json, results.json/csv, plots/, the study's
        files) into ``directory``; a folder holding another run is refused unless ``force``."""
        run = RunDir(directory, self.study.command, self._config, device=str(self._device), seed=self._seed)
        with run.start(force=force):
            write_outputs(run, self.study, self.results, self.spec,
                          Runtime(device=self._device, seed=self._seed, out=run.path))
        return run.path


def make_spec(study, options: dict):
    """The study's spec from keyword options (field or flag names; text values read as the CLI reads them)."""
    names = {}
    for field, opt, _ in spec_options(study.spec_class):
        names[field] = names[opt.key] = (field, opt)
    values = {}
    for key, value in options.items():
        if key not in names:
            valid = ", ".join(sorted({f for f, _ in names.values()}))
            raise FastablateError(f"{study.name}: unknown option {key!r}; options: {valid}")
        field, opt = names[key]
        if isinstance(value, str) and not isinstance(getattr(study.spec_class, field, None), str):
            value = parse_value(opt, value)  # "all", "1,2,4", "2G": as the flag reads them
        elif isinstance(value, list):
            value = tuple(value)
        values[field] = value
    try:
        return study.spec_class(**values)
    except TypeError as e:  # a value of the wrong kind for a field
        raise FastablateError(f"{study.name}: {e}") from None


@contextmanager
def preserved(models: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """The models on ``device`` for the block, then back as they came: device, every module's
    train/eval mode, every parameter's requires_grad and memory layout, and no ``.grad`` that
    was not there (the values of the parameters are a training's to change)."""
    saved = []
    for m in models:
        p = next(m.parameters(), None)
        saved.append((m, p.device if p is not None else None, [(s, s.training) for s in m.modules()],
                       [(q, q.requires_grad, q.grad is None, q.is_contiguous()) for q in m.parameters()]))
        if p is not None and p.device != device:
            m.to(device)
    try:
        yield
    finally:
        for m, dev, modes, params in saved:
            for s, training in modes:
                s.training = training
            for q, req, no_grad, contiguous in params:
                q.requires_grad_(req)
                if no_grad:
                    q.grad = None
                if contiguous and not q.is_contiguous():  # training runs channels-last
                    q.data = q.data.contiguous()
            if dev is not None and next(m.parameters()).device != dev:
                m.to(dev)


def _wrapped(model: nn.Module, mean, std, channels: int) -> NormalizedModel:
    """The model with its normalization: a NormalizedModel as it is, any other module wrapped
    (``mean``/``std``, default none), named after its class."""
    if isinstance(model, NormalizedModel):
        if mean is not None or std is not None:
            raise FastablateError(f"{model_name(model)} normalizes its inputs itself (mean "
                                  f"{model.mean.flatten().tolist()}): give no mean=/std=")
        return model
    if not isinstance(model, nn.Module):
        raise FastablateError(f"model of type {type(model).__name__}: expected a torch.nn.Module")
    mean = tuple(mean) if mean is not None else (0.0,) * channels
    std = tuple(std) if std is not None else (1.0,) * channels
    p = next(model.parameters(), None)
    wrapped = NormalizedModel(model, mean, std, arch=type(model).__name__)
    return wrapped.to(p.device) if p is not None else wrapped


def _device(model: Any, device: str | None) -> torch.device:
    """``device`` when given, else the model's own; a model with no parameters, or with them on
    the meta device (shapes without values), is refused."""
    first = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module) and first is None:
        raise FastablateError(f"model {type(model).__name__} has no parameters: nothing to study")
    if first is not None and first.is_meta:
        raise FastablateError(f"model {type(model).__name__} has its parameters on the meta device (shapes without "
                              "values): load or initialize its weights first (e.g. model.to_empty(device=...) and "
                              "a state_dict)")
    if device:
        return resolve_device(device)
    return first.device if first is not None else torch.device("cpu")


def _fitted(models: Sequence[Any], ds, mean, std, device: torch.device):
    """(the models wrapped and named apart, ``ds`` with as many classes as their outputs), each
    model checked against the images (channels, a forward pass, finite logits)."""
    wrapped = []
    for i, m in enumerate(models):
        w = _wrapped(m, mean, std, ds.images.shape[1] if ds.images is not None else 3)
        if i and model_name(w) in [model_name(o) for o in wrapped]:
            w.name = f"{model_name(w)} ({i + 1})"
        wrapped.append(w)
    outputs = [check_fits(w.to(device), ds) for w in wrapped]  # each takes the images, gives (batch, classes)
    for w, k in zip(wrapped, outputs):
        check_labels(w, k, ds)
    ds = image_set(ds, num_classes=max(outputs))
    for w in wrapped:
        w.num_classes, w.image_size = w.num_classes or max(outputs), w.image_size or ds.image_size
        if w.classes is None:
            w.classes = list(ds.classes)
    return wrapped, ds


def check_labels(model: NormalizedModel, outputs: int, ds) -> None:
    """Every label of ``ds`` is one of ``model``'s ``outputs`` classes."""
    if ds.num_classes > outputs or (len(ds) and int(ds.labels.max()) >= outputs):
        raise FastablateError(f"{ds.name}/{ds.split} has {max(ds.num_classes, int(ds.labels.max()) + 1)} classes, "
                              f"{model_name(model)} has {outputs} outputs")


def _sized(ds, image_size: int | None):
    """``ds`` with batches of ``image_size`` (resized on the device), when given."""
    from fastablate.data import resized

    return ds if image_size is None or image_size == ds.image_size else resized(ds, image_size)


# The options every command shares (Setup's) that a library call takes: read and checked by
# Setup itself, with its defaults; the rest of a call's options are the study's own.
SHARED = ("mean", "std", "device", "batch_size", "workers", "seed", "data_dir", "split", "limit", "image_size")


def _shared(options: dict, split: str) -> Setup:
    """The shared options taken out of ``options`` as a Setup, checked by the CLI's own spec (the
    same messages) before anything is computed or changed."""
    values = {"split": split, **{k: options.pop(k) for k in SHARED if k in options and options[k] is not None}}
    try:
        for k in ("mean", "std"):
            if k in values:
                values[k] = tuple(float(v) for v in values[k])
    except (TypeError, ValueError):
        raise FastablateError(f"mean={values.get('mean')!r}, std={values.get('std')!r}: give one number per channel "
                              "each, e.g. mean=(0.5, 0.5, 0.5)") from None
    return Setup(**values)


def _result(study, spec, results: list, ds, options: Setup, dev: torch.device, out: str | None) -> StudyResult:
    """The StudyResult of a library call, its config as the CLI's run.json would record it; saved with ``out``."""
    setup = replace(options, dataset=ds.name, mean=None, std=None)  # normalization: the model's, as the CLI's
    res = StudyResult(study, spec, results, run_config(study, setup, spec), dev, options.seed)
    if out is not None:
        res.save(out)
    return res


def run(study_name: str, model: nn.Module, data: Any, *, compare: Sequence[nn.Module] = (), progress: bool = False,
        out: str | None = None, **options) -> StudyResult:
    """Run the study registered as ``study_name`` (see the module); the functions below name it.
    ``options``: the study's own, and the options every command shares (:data:`SHARED`, with
    Setup's defaults: ``batch_size`` 128, ``seed`` 0, ...; ``device`` defaults to the model's,
    ``split`` of a registry dataset to the study's: paths' train, else test; ``image_size``
    resizes every batch on the device)."""
    study = get_study(study_name)
    device = options.get("device")
    setup = _shared(options, study.setup_defaults.get("split", "test"))
    spec = make_spec(study, options)
    if study.triggers and not set(study.triggers) & set(spec.given()):  # the CLI chooses the study by these
        named = [f"{t}= ({study.spec_class.flag(t)})" for t in study.triggers]
        raise FastablateError(f"{study.name} needs {'one of ' if len(named) > 1 else ''}{', '.join(named)}")
    dev = _device(model, device)
    models = [model, *compare]
    with preserved([m for m in models if isinstance(m, nn.Module)], dev):
        wrapped, ds = _fitted(models, _data(data, setup, setup.split), setup.mean, setup.std, dev)
        runtime = Runtime(device=dev, batch_size=setup.batch_size, workers=setup.workers, seed=setup.seed,
                          progress=progress)
        prepared = study.prepare(ds, spec, setup.seed)
        study.check(wrapped, prepared, spec)
        results = execute(study, wrapped, prepared, spec, runtime)
    return _result(study, spec, results, ds, setup, dev, out)


def _data(data: Any, setup: Setup, split: str):
    """``data`` as an ImageSet: the call's split, subset and image size."""
    return _sized(image_set(data, data_dir=setup.data_dir, split=split, limit=setup.limit, seed=setup.seed,
                            image_size=setup.image_size), setup.image_size)


def evaluate(model, data, **kw) -> StudyResult:
    """Accuracy, loss, per-class accuracy and the confusion matrix (``fastablate eval``)."""
    return run("evaluate", model, data, **kw)


def lesion(model, data, **kw) -> StudyResult:
    """Units deleted or reordered at test time (``eval --lesion``): ``plans``, ``k``, ``samples``."""
    return run("lesion", model, data, **kw)


def noise(model, data, **kw) -> StudyResult:
    """Gaussian noise on conv outputs or on the images (``eval --noise-sigma``): ``layers``, ``sigma``, ``trials``."""
    return run("noise", model, data, **kw)


def attack(model, data, **kw) -> StudyResult:
    """An attack on the correctly classified images (``fastablate attack``): ``attack``, ``pixels``, ``eps``."""
    return run("attack", model, data, **kw)


def paths(model, data, **kw) -> StudyResult:
    """Veit's paths: gradient per path length, effective paths (``fastablate paths``): ``samples``."""
    return run("paths", model, data, **kw)


def features(model, data, **kw) -> StudyResult:
    """Feature maps, channel grids, dead channels (``fastablate features``): ``layers``, ``method``.
    ``data`` may be images alone: their labels are then the model's predictions."""
    if isinstance(data, torch.Tensor):
        dev = _device(model, kw.get("device"))
        with preserved([model], dev), torch.no_grad():
            w = _wrapped(model, kw.get("mean"), kw.get("std"), data.shape[1])
            with eval_mode(w):
                labels = w(to_unit(data.detach()).to(dev)).argmax(1).cpu()
        data = (data, labels)
        kw.setdefault("images", len(labels))
    return run("features", model, data, **kw)


def train(model: nn.Module, train_data: Any, test_data: Any, *, progress: bool = False, out: str | None = None,
          **options) -> StudyResult:
    """Train ``model`` in place on ``train_data``, evaluating on ``test_data`` after every epoch
    (``fastablate train``: ``epochs``, ``lr``, ``optimizer``, ``lr_scaling``, ``schedule``,
    ``augment``, ``val_fraction``, ``keep``, ``freeze``, ``ema``, ``precision``, ``adv_train``,
    ...; and the shared options, as :func:`run` takes them). A registry name as data takes its
    train and test splits. With ``ema`` or ``keep="best"``, the weights that were kept end up in
    ``model``. ``save(dir)`` writes model.pt and metrics.csv beside the results."""
    from fastablate.models.transfer import freeze

    study = get_study("train")
    device = options.get("device")
    setup = _shared(options, "test")
    spec = make_spec(study, options)
    building = [n for n in ("init", "head", "dropout", "dropout_after", "stem", "stochastic_depth", "resume")
                if n in spec.given()]
    if building:
        raise FastablateError(f"train: {building[0]}= applies to fastablate train's registry models and runs; "
                              "build your model as you want it before fastablate.train")
    dev = _device(model, device)
    with preserved([model] if isinstance(model, nn.Module) else [], dev):
        [w], train_set = _fitted([model], _data(train_data, setup, "train"), setup.mean, setup.std, dev)
        test_set = _sized(image_set(test_data, data_dir=setup.data_dir, split="test", limit=setup.limit,
                                    seed=setup.seed, classes=train_set.classes, num_classes=w.num_classes,
                                    image_size=train_set.image_size), train_set.image_size)
        check_labels(w, w.num_classes, test_set)  # before the first step changes the model
        w.init = "none"
        w.frozen = freeze(w, spec.freeze) if spec.freeze else []
        data = study.data_from(train_set, test_set, spec, setup.seed)
        study.check([w], data, spec)
        runtime = Runtime(device=dev, batch_size=setup.batch_size, workers=setup.workers, seed=setup.seed,
                          progress=progress)
        results = execute(study, [w], data, spec, runtime)
        if results[0].trained is not w:  # --ema: the average is what was evaluated
            w.load_state_dict(results[0].trained.state_dict())
    return _result(study, spec, results, train_set, setup, dev, out)


__all__ = ["StudyResult", "attack", "evaluate", "features", "lesion", "noise", "paths", "run", "train"]
