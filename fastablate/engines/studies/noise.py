"""Noise robustness: Gaussian noise on the outputs of conv layers at inference, and on the
input images at the severities of CIFAR-10-C.

Activation noise: in each trial, n conv layers are drawn at random (or named, or every
n-th), each is perturbed with probability p, and a perturbed layer's output becomes
``out + sigma_l * z`` in place, through a forward hook calling ``fastablate.ops.gaussian_noise``.
``sigma_l`` is ``sigma``, or ``sigma`` times the layer's activation std on a calibration
batch (``relative``).

Reproducibility: the layers and the p-draws of trial t depend on (seed, n, t) only, so
every sigma and p of a sweep sees the same layers (common random numbers). The noise of
layer l in trial t is the Philox stream keyed by (seed, t, l), at offset (first image of
the batch) x (elements per image): image i gets the same noise whatever the batch size,
thread count or memory layout. What can change with the batch size is the rounding of the
convolutions themselves (a different algorithm may be picked), not the noise.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from fastablate.data import ImageSet, batches
from fastablate.engines.core.distributed import all_sum
from fastablate.engines.core.protocol import Study
from fastablate.engines.core.runtime import Runtime, check_finite, model_name, my_batches, progress, table
from fastablate.engines.core.spec import Choice, Float, Int, List, Spec, Text, applies, one_of, option
from fastablate.engines.studies.noise_hooks import LAYER_KINDS, LAYER_WORDS, NoiseInjector, conv_layers, stream_seed
from fastablate.errors import FastablateError
from fastablate.modes import eval_mode
from fastablate.ops import gaussian_noise
from fastablate.plots import colors, finish, subplots

# Hendrycks & Dietterich 2019, make_cifar_c.py: gaussian_noise severity 1..5 -> std on [0, 1] pixels.
CIFAR_C_GAUSSIAN = (0.04, 0.06, 0.08, 0.09, 0.10)


@dataclass(frozen=True)
class Point:
    """One grid point: ``layers`` = n (random layers), or the named/every-n layer set."""

    kind: str  # activation | input
    layers: int | str
    p: float
    sigma: float
    severity: int | None = None  # input noise: CIFAR-10-C severity


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    table = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
             2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
             2.045, 2.042)
    if df <= len(table):
        return table[df - 1]
    z = 1.959964  # Cornish-Fisher expansion, accurate to 1e-4 beyond 30
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def summarize(correct: Sequence[int], images: int) -> dict:
    """Mean, std and 95% t interval of the accuracies ``correct[t] / images`` of the trials.
    The mean is one division of integers, so equal trials give exactly their accuracy. One
    trial has no spread to estimate: its std and interval are None (null), not zero."""
    n = len(correct)
    mean = sum(correct) / (n * images)
    if n < 2:
        return {"accuracy_mean": mean, "accuracy_std": None, "ci95": None, "trials": n}
    std = math.sqrt(sum((c / images - mean) ** 2 for c in correct) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    # The t interval of the mean, clipped to the range an accuracy can take.
    return {"accuracy_mean": mean, "accuracy_std": std, "ci95": [max(0.0, mean - half), min(1.0, mean + half)],
            "trials": n}


@dataclass(frozen=True)
class NoiseSpec(Spec):
    layers: tuple[int, ...] = option((), "Numbers of random conv layers perturbed per trial, e.g. 1,2,3.",
                                     type=List(Int(min=1)), flag="--noise-layers")
    at: tuple[str, ...] = option((), "Named conv layers instead, e.g. layer1.0.conv1,layer2.1.conv2.",
                                 type=List(Text()), flag="--noise-at")
    every: Optional[int] = option(None, "Every n-th conv layer instead.", type=Int(min=1), flag="--noise-every")
    p: tuple[float, ...] = option((1.0,), "Probabilities that a chosen layer is perturbed.",
                                  type=List(Float(0, 1)), flag="--noise-p")
    sigma: tuple[float, ...] = option((), "Noise std values, e.g. 0.1,0.5,1.0.", type=List(Float(0, 1e6)),
                                      flag="--noise-sigma")
    relative: bool = option(False, "sigma times each layer's activation std.", flag="--noise-relative")
    on: str = option("conv", "The layers noise goes on: conv, linear (a transformer's) or all.",
                     type=Choice(*LAYER_KINDS), flag="--noise-on")
    input_severities: tuple[int, ...] = option((), "Noise on the images: CIFAR-10-C gaussian_noise severities, "
                                                   "e.g. 1,3,5.", type=List(Int(1, 5)), flag="--input-noise")
    trials: int = option(10, "Trials per grid point.", type=Int(min=1, max=100_000))

    def validate(self) -> None:
        one_of(self, ("layers", "at", "every"), "choose the perturbed layers")
        choices = [self.flag(n) for n in ("layers", "at", "every") if getattr(self, n) not in ((), None)]
        if choices and not self.sigma:
            raise FastablateError(f"{choices[0]} needs --noise-sigma (the noise std values)")
        if self.sigma and not choices:
            raise FastablateError("--noise-sigma needs the layers to perturb: --noise-layers N,.., --noise-at NAME,.. "
                                  "or --noise-every N")
        if self.relative and not self.sigma:
            raise FastablateError("--noise-relative scales --noise-sigma, which is not given")
        applies(self, "p", bool(self.sigma), "noise on conv layers (--noise-sigma), which is not given")
        applies(self, "on", bool(self.sigma), "noise on layers (--noise-sigma), which is not given")


@dataclass
class NoiseResult:
    model: str
    clean: dict
    grid: list[dict]
    n: int
    seconds: float
    layer_names: list[str]
    activation_std: list[float] | None = None

    def to_dict(self) -> dict:
        out = {"model": self.model, "clean": self.clean, "grid": self.grid, "n": self.n, "seconds": self.seconds,
               "conv_layers": self.layer_names}
        if self.activation_std is not None:
            out["activation_std"] = dict(zip(self.layer_names, self.activation_std))
        return out

    def rows(self) -> list[dict]:
        return [{"model": self.model, "kind": g["kind"], "layers": g["layers"], "p": g["p"], "sigma": g["sigma"],
                 "severity": g.get("severity", ""), "accuracy_mean": g["accuracy_mean"],
                 "accuracy_std": g["accuracy_std"], "ci95_low": g["ci95"] and g["ci95"][0],
                 "ci95_high": g["ci95"] and g["ci95"][1],
                 "trials": g["trials"]} for g in self.grid]

    def plot(self, directory: Path, *others: "NoiseResult") -> list[Path]:
        return plot_noise([self, *others], directory)


def resolve_layers(spec: NoiseSpec, names: list[str], name: str) -> list[int | str]:
    """The grid's layer settings: each n of ``spec.layers``, or one named/every-n set."""
    kind = LAYER_WORDS[spec.on]
    if not names:
        raise FastablateError(f"--noise-sigma: {name} has no {kind} layer to perturb"
                              + ("; --noise-on linear or all perturbs linear layers" if spec.on == "conv" else ""))
    if spec.at:
        unknown = [a for a in spec.at if a not in names]
        if unknown:
            raise FastablateError(f"--noise-at: {name} has no {kind} layer {unknown[0]!r}; "
                                  f"{kind} layers are: {', '.join(names)}")
        return [",".join(spec.at)]
    if spec.every:
        if spec.every > len(names):
            raise FastablateError(f"--noise-every {spec.every}: {name} has {len(names)} {kind} layers, so no layer "
                                  f"would be perturbed; n must be in 1..{len(names)}")
        return [f"every {spec.every}"]
    for n in spec.layers:
        if not 1 <= n <= len(names):
            raise FastablateError(f"--noise-layers {n}: {name} has {len(names)} {kind} layers, "
                                  f"so n must be in 1..{len(names)}")
    return list(spec.layers)


def trial_layers(setting: int | str, names: list[str], spec: NoiseSpec, seed: int, trial: int, p: float) -> list[int]:
    """The layer indices perturbed in ``trial``: chosen by (seed, setting, trial), each kept
    if its uniform draw is below p (so a larger p perturbs a superset)."""
    rng = random.Random(f"{seed}:{setting}:{trial}")
    if isinstance(setting, int):
        chosen = sorted(rng.sample(range(len(names)), setting))
    elif setting.startswith("every "):
        chosen = list(range(spec.every - 1, len(names), spec.every))
    else:
        chosen = [names.index(a) for a in spec.at]
    draws = [rng.random() for _ in chosen]
    return [i for i, u in zip(chosen, draws) if u < p]


@torch.no_grad()
def _accuracy(model: nn.Module, ds: ImageSet, runtime: Runtime, injector: NoiseInjector | None,
              input_sigma: float = 0.0, input_seed: int = 0) -> int:
    """The number of images of this process's batches of ``ds`` classified correctly. The
    noise of an image is keyed by its index in ``ds``, whoever evaluates it."""
    correct = 0
    for i, x, y in my_batches(ds, runtime.with_(progress=False), ""):
        row = i * runtime.batch_size
        if input_sigma > 0:
            # CIFAR-10-C: clip(x + N(0, c^2), 0, 1), stored as uint8 (truncated).
            x = gaussian_noise(x, input_sigma, seed=input_seed, offset=row * x[0].numel(), inplace=True)
            x = x.clamp_(0, 1).mul_(255).floor_().div_(255)
        if injector is not None:
            injector.row = row
        logits = model(x)
        if injector is None and input_sigma == 0:  # the clean pass
            check_finite(model, logits, x)
        correct += (logits.argmax(1) == y).sum().item()
    return correct


def run_noise(model: nn.Module, ds: ImageSet, spec: NoiseSpec, runtime: Runtime, *,
              op: Callable = gaussian_noise) -> NoiseResult:
    """Clean accuracy, then every grid point over ``spec.trials`` trials."""
    start = time.perf_counter()
    name, seed = model_name(model), runtime.seed
    injector = NoiseInjector(model, op, spec.on)
    names = [n for n, _ in injector.layers]
    try:
        with eval_mode(model):
            settings = resolve_layers(spec, names, name) if spec.sigma else []
            stds = None
            if spec.relative and spec.sigma:
                order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
                calib = next(batches(ds.subset(order[:runtime.batch_size]), runtime.batch_size,
                                     device=runtime.device))[0]
                stds = injector.activation_std(model, calib)
            points = [Point("activation", s, p, sigma) for s in settings for p in spec.p for sigma in spec.sigma]
            points += [Point("input", 0, 1.0, CIFAR_C_GAUSSIAN[s - 1], s) for s in spec.input_severities]
            work = [(pt, t) for pt in points for t in range(spec.trials)]
            clean = _accuracy(model, ds, runtime, injector)
            correct: dict[Point, list[int]] = {pt: [] for pt in points}
            for pt, t in progress(work, desc=f"noise {name}", enabled=runtime.progress):
                if pt.kind == "input":
                    acc = _accuracy(model, ds, runtime, None, pt.sigma, stream_seed(seed, "input", pt.severity, t))
                else:
                    injector.active = {i: (pt.sigma * (stds[i] if stds else 1.0), stream_seed(seed, t, i))
                                       for i in trial_layers(pt.layers, names, spec, seed, t, pt.p) if pt.sigma > 0}
                    acc = _accuracy(model, ds, runtime, injector) if injector.active else clean
                    injector.active = {}
                correct[pt].append(acc)
    finally:
        injector.remove()
    counts = all_sum(torch.tensor([clean] + [c for pt in points for c in correct[pt]], dtype=torch.int64)).tolist()
    clean, rest = counts[0], iter(counts[1:])
    correct = {pt: [next(rest) for _ in range(spec.trials)] for pt in points}
    grid = []
    for pt in points:
        row = {"kind": pt.kind, "layers": pt.layers, "p": pt.p, "sigma": pt.sigma}
        if pt.kind == "activation":
            row["relative"] = spec.relative
        else:
            row["severity"] = pt.severity
        grid.append({**row, **summarize(correct[pt], len(ds))})
    return NoiseResult(name, {"accuracy": clean / len(ds)}, grid, len(ds), time.perf_counter() - start, names, stds)


def comparison_table(results: Sequence[NoiseResult]) -> list[dict]:
    """Rows: model and (p, sigma); columns: clean accuracy and mean accuracy per layer setting
    (the layout of the ResNet34-vs-VGG19 table: n = 1, 2, 3)."""
    rows = []
    for r in results:
        by: dict[tuple, dict] = {}
        for g in r.grid:
            if g["kind"] != "activation":
                continue
            row = by.setdefault((g["p"], g["sigma"]), {"model": r.model, "p": g["p"], "sigma": g["sigma"],
                                                         "clean": r.clean["accuracy"]})
            row[f"n={g['layers']}" if isinstance(g["layers"], int) else g["layers"]] = g["accuracy_mean"]
        rows += list(by.values())
    return rows


def plot_noise(results: Sequence[NoiseResult], directory: Path) -> list[Path]:
    """Accuracy vs sigma, one line per layer setting and p (95% interval as error bars), one
    colour per layer setting, one line style per model; and accuracy vs input-noise severity."""
    palette = colors()
    styles = ["-", "--", ":", "-."]
    paths = []
    act = [[g for g in r.grid if g["kind"] == "activation"] for r in results]
    if any(act):
        fig, ax = subplots(figsize=(6.5, 4.2))
        settings: list = []  # (layers, p) in order of first appearance
        for g in (g for grid in act for g in grid):
            if (g["layers"], g["p"]) not in settings:
                settings.append((g["layers"], g["p"]))
        for r, grid, ls in zip(results, act, styles):
            for key in settings:
                pts = sorted((g for g in grid if (g["layers"], g["p"]) == key), key=lambda g: g["sigma"])
                if not pts:
                    continue
                xs = [0.0] + [g["sigma"] for g in pts]
                ys = [r.clean["accuracy"]] + [g["accuracy_mean"] for g in pts]
                lo = [0.0] + [g["accuracy_mean"] - g["ci95"][0] if g["ci95"] else 0.0 for g in pts]
                hi = [0.0] + [g["ci95"][1] - g["accuracy_mean"] if g["ci95"] else 0.0 for g in pts]
                n = key[0] if isinstance(key[0], str) else f"n={key[0]}"
                ax.errorbar(xs, ys, yerr=[lo, hi], ls=ls, marker="o", ms=3, capsize=2,
                            color=palette[settings.index(key) % len(palette)],
                            label=f"{r.model} {n}" + (f" p={key[1]:g}" if key[1] != 1 else ""))
        relative = any(g.get("relative") for grid in act for g in grid)
        paths.append(finish(fig, ax, directory / "noise-activation.png", legend_size=7, ylabel="accuracy",
                            xlabel="sigma" + (" (x activation std)" if relative else ""),
                            title="Gaussian noise on conv outputs", ylim=(0, 1.02)))
    inp = [[g for g in r.grid if g["kind"] == "input"] for r in results]
    if any(inp):
        fig, ax = subplots(figsize=(6, 4))
        for r, grid, c in zip(results, inp, palette):
            xs = [0] + [g["severity"] for g in grid]
            ys = [r.clean["accuracy"]] + [g["accuracy_mean"] for g in grid]
            ax.plot(xs, ys, "o-", color=c, label=r.model)
        paths.append(finish(fig, ax, directory / "noise-input.png", ylabel="accuracy", ylim=(0, 1.02),
                            xlabel="CIFAR-10-C gaussian_noise severity (0 = clean)",
                            title="Gaussian noise on the input"))
    return paths


class NoiseStudy(Study):
    """Noise study: Gaussian noise on the outputs of conv layers (--noise-sigma) or on the
    images at CIFAR-10-C severities (--input-noise), over repeated trials."""

    name = "noise"
    command = "eval"
    spec_class = NoiseSpec
    triggers = ("sigma", "input_severities")

    def check(self, models, data, spec):
        for m in models:  # bad layer choices fail before anything is written
            if spec.sigma:
                resolve_layers(spec, [n for n, _ in conv_layers(m, spec.on)], model_name(m))

    def run(self, model, data, spec, runtime):
        return run_noise(model, data, spec, runtime)

    def document(self, results, spec):
        return {"table": comparison_table(results), **super().document(results, spec)}

    def metrics(self, document: dict) -> dict[str, float]:
        out = {"clean_accuracy": document["clean"]["accuracy"]}
        for g in document["grid"]:
            key = (f"n{g['layers']}_p{g['p']:g}_sigma{g['sigma']:g}" if g["kind"] == "activation"
                   else f"input{g['severity']}")
            out[f"accuracy_{key.replace(' ', '')}"] = g["accuracy_mean"]
        return out

    def report(self, results: Sequence[NoiseResult], spec) -> str:
        cols = ("model", "kind", "layers", "p", "sigma", "severity", "accuracy_mean", "accuracy_std", "ci95_low",
                "ci95_high")
        out = [table([r for res in results for r in res.rows()], cols)]
        if spec.sigma:
            out.append("\n" + table(comparison_table(results)))
        out += [f"{r.model}: clean accuracy {r.clean['accuracy']:.4f} on {r.n} images; {len(r.grid)} grid points x "
                f"{spec.trials} trials in {r.seconds:.1f}s" for r in results]
        return "\n".join(out)
