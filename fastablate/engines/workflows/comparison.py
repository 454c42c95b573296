"""The whole comparison in one command: does a ResNet behave like an ensemble of shallow
networks, and how much noise and adversarial change does it survive next to a network
without shortcuts?

``fastablate study`` trains the models (or takes checkpoints), then runs every part on them,
each an ordinary run directory inside the study's ``--out``: ``train-<model>``, ``eval``,
``lesion``, ``noise``, ``attack-sparse``, ``attack-noise``, ``paths``, ``features``. A rerun
reuses every finished part whose options are unchanged. Then report.md and a self-contained
report.html, with one verdict per finding computed from the numbers
(:mod:`fastablate.engines.workflows.report`).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from fastablate.engines.core.attack_options import DEFAULT_PIXELS, AttackOptions
from fastablate.engines.core.setup import Setup
from fastablate.engines.core.spec import (Choice, Float, Int, List, ModelFile, Spec, Text, one_of, option, option_of,
                                          spec_options)
from fastablate.engines.core.tracking import tracked
from fastablate.engines.studies.attacks import AttackSpec
from fastablate.engines.studies.evaluate import EvaluateSpec
from fastablate.engines.studies.features import FeaturesSpec
from fastablate.engines.studies.lesion import LesionSpec
from fastablate.engines.studies.noise import NoiseSpec
from fastablate.engines.studies.paths import PathsSpec
from fastablate.engines.studies.train import TrainSpec
from fastablate.errors import FastablateError, note
from fastablate.rundir import TRACKING, RunDir, default_out, finished, read_run

PARTS = ("train", "eval", "lesion", "noise", "attack", "paths", "features")


@dataclass(frozen=True)
class StudySpec(Spec):
    models: tuple[str, ...] = option(("resnet20", "plain20"), "Registry models to train and compare (the first "
                                                              "is the reference); or give --weights/--compare.",
                                     type=List(Text("NAME")))
    epochs: int = option(6, "Training epochs per model.", type=Int(min=1, max=100_000))
    lr: float = option(0.1, "Peak learning rate per 128 images (one-cycle schedule).",
                       type=Float(0, 100, min_open=True))
    val_fraction: float = option(0.0, "Training: hold out this fraction of each class of the training split as a "
                                      "validation set (train --val-fraction).", type=Float(0, 1, max_open=True))
    keep: str = option("last", "Training: the weights each model keeps, the last epoch's or the best by validation "
                               "accuracy (test accuracy without --val-fraction).", type=Choice("last", "best"))
    only: tuple[str, ...] = option((), "Run only these parts.", type=List(Choice(*PARTS)))
    skip: tuple[str, ...] = option((), "Leave these parts out.", type=List(Choice(*PARTS)))
    eval_limit: Optional[int] = option(None, "Test images for the studies (a seeded class-balanced subset) "
                                             "[default: all].", type=Int(min=1))
    samples: int = option_of(LesionSpec, "samples", 10, "Samples of the random parts: lesion's random sets per k "
                                                        "and orders (eval --samples); paths' unit sets per length, "
                                                        "twice as many (paths --samples).")
    noise_sigma: tuple[float, ...] = option((0.25, 0.5, 1.0), "Noise: sigma grid, relative to each layer's "
                                                              "activation std.", type=List(Float(0, 1e6)))
    trials: int = option(3, "Noise: trials per grid point.", type=Int(min=2, max=10_000))
    noise_p: tuple[float, ...] = option((1.0,), "Noise: probabilities that each of the n chosen conv layers is "
                                                "perturbed, e.g. 0.5,1.", type=List(Float(0, 1)))
    stochastic_depth: Optional[float] = option(None, "Also train the first of --models with stochastic depth (this "
                                                     "survival probability of its last unit) and study it beside "
                                                     "the others.", type=Float(0, 1, min_open=True, max_open=True))
    attack_limit: Optional[int] = option(200, "Test images attacked (a seeded class-balanced subset).",
                                         type=Int(min=1))
    queries: int = option_of(AttackOptions, "queries", 30, "Sparse attack: random-search queries per image for the "
                                                           "images its gradient steps leave (attack --queries).")
    pixels: float = option_of(AttackOptions, "pixels", DEFAULT_PIXELS, "Sparse attack budget as a fraction of the "
                                                                       "pixels (attack --pixels).")
    images: int = option(4, "Features: images drawn.", type=Int(min=1, max=64))

    def validate(self) -> None:
        one_of(self, ("only", "skip"), "choose the parts")
        if len(set(self.models)) != len(self.models):
            raise FastablateError(f"--models {','.join(self.models)} names a model twice")

    def parts(self) -> list[str]:
        return [p for p in PARTS if (p in self.only if self.only else p not in self.skip)]


@dataclass
class Part:
    name: str  # the run directory's name
    study: str  # the registered study that runs it
    document: dict | None = None  # its results.json
    path: Path | None = None
    reused: bool = False
    seconds: float = 0.0


def run_part(part: Part, setup: Setup, spec: Spec, echo) -> Part:
    from fastablate.engines import get_study
    from fastablate.engines.core import distributed as dist
    from fastablate.engines.core.runner import run_config, run_inputs, run_study

    study = get_study(part.study)
    setup = replace(setup, **{n: d for n, _, d in spec_options(Setup) if n in study.setup_excludes})
    config = run_config(study, setup, spec)
    part.path = Path(setup.out)
    done = finished(part.path, config, run_inputs(setup, spec))  # the same options, and inputs unchanged
    if done is not None:
        echo(f"study: {part.name}: finished already, reused")
        part.document, part.reused = done, True
        return part
    echo(f"study: {part.name} ...")
    start = time.perf_counter()
    part.document = run_study(study, replace(setup, force=True), spec).document
    dist.barrier()  # under torchrun: what process 0 wrote is there before any process reads on
    part.seconds = time.perf_counter() - start
    echo(f"study: {part.name} done in {part.seconds:.1f}s")
    return part


def run_comparison(setup: Setup, spec: StudySpec, echo=print) -> tuple[Path, dict[str, Part]]:
    """Train (or load) the models, run every chosen part, write report.md and report.html."""
    from fastablate.engines.core import distributed as dist
    from fastablate.engines.core.runner import start_on_main
    from fastablate.engines.workflows.report import write_reports

    _check_models(setup, spec)
    # Under torchrun every process runs each part (which shards its work); process 0 writes.
    main = dist.init(setup.device)[0] == 0
    echo = echo if main else (lambda *args, **kwargs: None)
    out = Path(dist.broadcast(str(setup.out or default_out("study"))))
    config = {"setup": {k: v for k, v in setup.to_dict().items() if k not in TRACKING}, "study": spec.to_dict()}
    run = RunDir(out, "study", config, device=setup.device, seed=setup.seed)
    resume = (read_run(out) or {}).get("command") == "study"
    tracker = setup.tracker() if main else None  # the study's run; each part logs as its child
    start_on_main(run, resume=resume, force=setup.force)
    with run if main else contextlib.nullcontext(), tracked(tracker, out, config):
        job = Comparison(out, replace(setup, compare=(), out=None, force=True), spec, {}, echo)
        checkpoints, first_arch = job.models(setup)
        entries = job.studies(checkpoints, first_arch)
        if not main:
            return out, job.parts
        write_reports(out, setup, spec, job.parts, entries)
        run.write_json("results.json", {"parts": {n: {"path": str(p.path), "reused": p.reused,
                                                      "seconds": round(p.seconds, 3)} for n, p in job.parts.items()},
                                        "report": ["report.md", "report.html"]})
    return out, job.parts


def _check_models(setup: Setup, spec: StudySpec) -> None:
    if setup.weights is not None and ("models" in spec.given() or spec.stochastic_depth is not None):
        flag = "--models" if "models" in spec.given() else "--stochastic-depth"
        raise FastablateError(f"{flag} trains models; --weights/--compare give trained ones: use one or the other")
    if setup.weights is not None and "train" in spec.only:
        raise FastablateError("--only train: with --weights the models are given, there is nothing to train")


@dataclass
class Comparison:
    """One run of ``fastablate study``: where it writes, the options its parts share, and the
    parts as they finish."""

    out: Path
    base: Setup  # the shared options of every part
    spec: StudySpec
    parts: dict[str, Part]
    echo: object

    def part(self, name: str, study: str, part_spec: Spec, setup: Setup, **changes) -> None:
        self.parts[name] = run_part(Part(name, study), replace(setup, out=str(self.out / name), **changes),
                                    part_spec, self.echo)

    def models(self, setup: Setup) -> tuple[list[str], str | None]:
        """(the checkpoints, the first as a file and the others as MODEL=FILE; the first's model):
        trained here (train-<model>/model.pt, with the recipe below) or given."""
        if setup.weights is not None:
            return [setup.weights, *setup.compare], setup.model  # --model: a foreign --weights file's
        spec, checkpoints = self.spec, []
        trained = [(name, f"train-{name}", 1.0) for name in spec.models]
        if spec.stochastic_depth is not None:  # Veit's contrast: the first model trained with stochastic depth
            trained.append((spec.models[0], f"train-{spec.models[0]}-sd{spec.stochastic_depth:g}",
                            spec.stochastic_depth))
        for name, folder, survival in trained:
            recipe = TrainSpec(epochs=spec.epochs, lr=spec.lr, schedule="onecycle", label_smoothing=0.1, ema=0.99,
                               stochastic_depth=survival, val_fraction=spec.val_fraction, keep=spec.keep)
            if "train" in spec.parts() or not (self.out / folder / "model.pt").is_file():
                self.part(folder, "train", recipe, replace(self.base, model=name))
            # A checkpoint never names code to run: each part is told its model.
            checkpoints.append(f"{name}={self.out / folder / 'model.pt'}" if checkpoints else
                               str(self.out / folder / "model.pt"))
        return checkpoints, spec.models[0]

    def studies(self, checkpoints: list[str], first_arch: str | None) -> list[tuple[str | None, str]]:
        """Every chosen part on the models; returns (model, file) of each."""
        spec, wanted = self.spec, self.spec.parts()
        first, others = checkpoints[0], tuple(checkpoints[1:])
        setup = replace(self.base, model=first_arch, weights=first, compare=others, limit=spec.eval_limit,
                        split="test")
        entries = [(first_arch, first)] + [ModelFile.split(c) for c in others]
        views = [(c, _view(*e)) for c, e in zip(checkpoints, entries)]  # None: the parts' loading says why
        if "eval" in wanted:
            self.part("eval", "evaluate", EvaluateSpec(), setup)
        if "lesion" in wanted:
            plans = ("all-single", "k-random") + (("reorder",) if all(_reorderable(v) for _, v in views) else ())
            if "reorder" not in plans:
                note("study: a model has no two units of the same shape; the lesion part leaves reorder out")
            self.part("lesion", "lesion", LesionSpec(plans=plans, samples=spec.samples), setup)
        if "noise" in wanted:
            self.part("noise", "noise", NoiseSpec(layers=(1, 2, 3), sigma=spec.noise_sigma, relative=True,
                                                  p=spec.noise_p, trials=spec.trials, input_severities=(1, 3, 5)),
                      setup)
        if "attack" in wanted:
            sparse = AttackSpec(attack="sparse", pixels=spec.pixels, queries=spec.queries, save_examples=True)
            self.part("attack-sparse", "attack", sparse, setup, limit=spec.attack_limit)
            self.part("attack-noise", "attack", AttackSpec(attack="noise"), setup, limit=spec.attack_limit)
        if "paths" in wanted:
            self.paths(setup, views, entries)
        if "features" in wanted:
            self.features(setup)
        return entries

    def paths(self, setup: Setup, views: list, entries: list) -> None:
        """Paths on the models with residual units (on training images, as Veit measured)."""
        residual = [(c, e) for (c, v), e in zip(views, entries) if v is not None and v.residual()]
        if not residual:
            note("study: no model has residual units; the paths part is left out")
            return
        (arch, path), rest = residual[0][1], tuple(c for c, _ in residual[1:])
        self.part("paths", "paths", PathsSpec(samples=2 * self.spec.samples), setup, model=arch, weights=path,
                  compare=rest, split="train", limit=self.base.limit)

    def features(self, setup: Setup) -> None:
        """Feature maps: clean vs adversarial when the sparse attack fooled an image, else clean vs
        noisy (the largest sigma on 3 random conv layers) when the noise part runs."""
        examples = self.out / "attack-sparse" / "adversarial.pt"
        if _fooled_any(examples):
            view = {"examples": str(examples)}
        elif "noise" in self.spec.parts():
            view = {"noise_sigma": max(self.spec.noise_sigma), "noise_layers": 3, "noise_relative": True}
        else:
            view = {}
        self.part("features", "features", FeaturesSpec(images=self.spec.images, **view), setup)


def _fooled_any(examples: Path) -> bool:
    """Whether the sparse attack's adversarial.pt holds a fooled image (features compares them)."""
    import torch

    if not examples.is_file():
        return False
    return bool(torch.load(examples, map_location="cpu", weights_only=True)["success"].any())


def _view(arch: str | None, checkpoint: str):
    """The unit view of a checkpoint's model (a foreign file's built as ``arch``), or None."""
    from fastablate.models import load_model
    from fastablate.units import units

    norm = {} if arch is None else {"mean": (0.5,) * 3, "std": (0.5,) * 3}  # a foreign file's: the structure only
    try:
        return units(load_model(checkpoint, arch, **norm))
    except FastablateError:
        return None  # a foreign file: the parts' own loading says what is wrong with it


def _reorderable(view) -> bool:
    from fastablate.engines.studies.lesion import swappable_groups

    return view is not None and bool(swappable_groups(view))
