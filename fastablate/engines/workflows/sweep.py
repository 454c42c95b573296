"""Sweeps: a grid over options of any study command, each point a full run directory, the
points' headline numbers in one table; per metric a line (numbers) or bar chart (categories
such as ``augment``) of each option alone, grouped lines of each option by each other one,
and heatmaps of every pair.

A point is the base command's options with the grid's values put in, run with ``repeat``
seeds (the base seed, +1, ...). Its key is a hash of everything that shapes the run (the
study, every option but where it writes, the seed), and its run directory is
``<out>/points/<key>``: a rerun skips complete points and reruns failed or unfinished ones;
extending the grid runs only the new points. A failing point is recorded with its error line
and does not stop the others.

Backends: ``local`` runs the points one after another in this process; ``ray`` runs each as
a Ray task (``num_cpus``/``num_gpus`` per point) on a Ray cluster, with the same results for
the same seeds: each point runs with ``cpus_per_point`` threads in both backends (default: the
threads torch uses here), and the thread count is part of its key, since kernels that reduce
across threads may round differently with another count.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from fastablate.engines.core.runtime import table
from fastablate.engines.core.spec import Choice, Float, Int, List, NamedFiles, Spec, Text, applies, option, parse_value
from fastablate.engines.core.tracking import Tracker, parent, tracked
from fastablate.errors import FastablateError
from fastablate.plots import save, subplots
from fastablate.rundir import VOLATILE, RunDir, default_out, finished, jsonable, read_run


@dataclass(frozen=True)
class SweepSpec(Spec):
    repeat: int = option(1, "Seeds per grid point (the base --seed, +1, +2, ...).", type=Int(min=1, max=1000))
    backend: str = option("local", "Where points run: one after another here, or as Ray tasks.",
                          type=Choice("local", "ray"))
    address: Optional[str] = option(None, "ray: the cluster to join (HOST:PORT or auto) [default: a local "
                                          "instance].", type=Text("ADDRESS"))
    cpus_per_point: Optional[int] = option(None, "CPU threads per point, on either backend (and Ray's num_cpus) "
                                                 "[default: the threads torch uses here].",
                                           type=Int(min=1, max=1024))
    gpus_per_point: float = option(0.0, "ray: GPUs per point (Ray's num_gpus).", type=Float(0, 64))
    out: Optional[str] = option(None, "Output directory of the sweep [default: runs/sweep-<timestamp>].",
                                type=Text("DIR"))

    def validate(self) -> None:
        applies(self, ("address", "gpus_per_point"), self.backend == "ray", "--backend ray")


@dataclass(frozen=True)
class Axis:
    """One swept option: where it goes (``setup`` or ``spec``), its field, flag and values."""

    owner: str
    field: str
    flag: str
    values: tuple


def grid_axes(items: Sequence[str], field, study) -> list[Axis]:
    """The axes of ``--grid OPTION=V,V,..`` items (values split at ``;`` when one holds a comma, or
    for a list-valued option), each value read and checked as its flag is; ``field(name)`` gives
    the base command's (spec class, field, Option) of an option name."""
    from fastablate.engines.core.setup import Setup

    axes = []
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not text:
            raise FastablateError(f"--grid {item!r} is not OPTION=VALUE,VALUE,...")
        try:
            cls, name, opt = field(key)
        except FastablateError as e:
            raise FastablateError(f"--grid {key}: {e}") from None
        if cls not in (Setup, study.spec_class) or name in ("out", "force"):
            raise FastablateError(f"--grid {key}: {opt.flag} is not an option {study.name} can sweep")
        sep = ";" if ";" in text or isinstance(opt.type, (List, NamedFiles)) else ","
        values = tuple(parse_value(opt, v.strip(), f" (in --grid {key})") for v in text.split(sep))
        axes.append(Axis("setup" if cls is Setup else "spec", name, opt.flag, values))
    return axes


def point_key(point: dict) -> str:
    """A stable hash of what shapes a point's run."""
    shaped = {"study": point["study"], "seed": point["seed"], "threads": point["threads"],
              "setup": {k: v for k, v in point["setup"].items() if k not in VOLATILE}, "spec": point["spec"]}
    return hashlib.blake2b(json.dumps(jsonable(shaped), sort_keys=True).encode(), digest_size=6).hexdigest()


def make_points(study: str, setup: dict, spec: dict, axes: Sequence[Axis], repeat: int, threads: int) -> list[dict]:
    """Every (grid combination, seed) as a point dict, each run with ``threads`` CPU threads."""
    points = []
    for combo in itertools.product(*(a.values for a in axes)):
        s, p = dict(setup), dict(spec)
        for a, v in zip(axes, combo):
            (s if a.owner == "setup" else p)[a.field] = v
        base_seed = s.get("seed", 0)
        for r in range(repeat):
            pt = {"study": study, "setup": {**s, "seed": base_seed + r}, "spec": p,
                  "params": {a.flag.lstrip("-"): v for a, v in zip(axes, combo)}, "seed": base_seed + r,
                  "threads": threads}
            pt["key"] = point_key(pt)
            points.append(pt)
    return points


def build(point: dict):
    """(study, Setup, spec) of a point; a bad value is a FastablateError."""
    from fastablate.engines import get_study
    from fastablate.engines.core.setup import Setup

    study = get_study(point["study"])
    return study, Setup(**point["setup"]), study.spec_class(**point["spec"])


def run_point(point: dict, out: str) -> dict:
    """Run one point into ``<out>/points/<key>`` with its thread count and return its row
    (params, seed, status, seconds, metrics or error). Importable by Ray workers."""
    import torch

    from fastablate.engines.core.runner import run_study

    torch.set_num_threads(point["threads"])
    path = Path(out) / "points" / point["key"]
    row = _row(point)
    start = time.perf_counter()
    try:
        study, setup, spec = build(point)
        from dataclasses import replace

        with parent(point.get("parent") or {}):  # the sweep's tracking run, if any
            outcome = run_study(study, replace(setup, out=str(path)), spec)
        return {**row, "status": "complete", "seconds": _seconds(path), **study.metrics(outcome.document)}
    except Exception as e:  # a failing point is recorded, the others go on
        if isinstance(e, FastablateError):
            line = str(e)
        else:  # a bug, not bad input: keep the traceback beside the point
            line = f"{type(e).__name__}: {e}".splitlines()[0]
            path.mkdir(parents=True, exist_ok=True)
            (path / "traceback.txt").write_text(traceback.format_exc())
        return {**row, "status": "failed", "seconds": round(time.perf_counter() - start, 3), "error": line}


def _row(point: dict) -> dict:
    return {**point["params"], "seed": point["seed"], "key": point["key"]}


def _seconds(path: Path) -> float | None:
    """The total time a finished point's run.json records."""
    return (read_run(path) or {}).get("timings", {}).get("total_s")


def run_sweep(study_name: str, setup: dict, spec: dict, axes: Sequence[Axis], sweep: SweepSpec,
              echo=print) -> tuple[Path, list[dict]]:
    """Run (or resume) a sweep; returns its folder and one row per point."""
    from fastablate.engines import get_study
    from fastablate.engines.core.runner import run_inputs

    if not axes:
        raise FastablateError("sweep needs at least one --grid OPTION=VALUE,VALUE")
    import torch

    points = make_points(study_name, setup, spec, axes, sweep.repeat, sweep.cpus_per_point or torch.get_num_threads())
    inputs = {}  # each point's input files, fingerprinted: a finished point is reused only if they are unchanged
    for pt in points:  # every point's options are checked before anything runs
        try:
            _, point_setup, point_spec = build(pt)
        except FastablateError as e:
            raise FastablateError(f"grid point {', '.join(f'{k}={v}' for k, v in pt['params'].items())}: {e}") \
                from None
        inputs[pt["key"]] = run_inputs(point_setup, point_spec)
    study = get_study(study_name)
    out = Path(sweep.out or default_out("sweep"))
    config = {"study": study_name, "base": {"setup": setup, "spec": spec},
              "grid": {a.flag.lstrip("-"): list(a.values) for a in axes}, **sweep.to_dict()}
    resume = (read_run(out) or {}).get("command") == "sweep"
    rows: dict[str, dict] = {}
    tracker = Tracker(setup.get("tensorboard", False), setup.get("mlflow"))  # the sweep's run; points its children
    with RunDir(out, "sweep", config, device="-", seed=setup.get("seed", 0)).start(resume=resume) as run, \
            tracked(tracker, out, config):
        parent_ids = tracker.ids
        todo = []
        for pt in points:
            document = finished(out / "points" / pt["key"], inputs=inputs[pt["key"]])
            if document is not None:
                rows[pt["key"]] = {**_row(pt), "status": "complete", "seconds": _seconds(out / "points" / pt["key"]),
                                   **study.metrics(document)}
            else:
                todo.append({**pt, "parent": parent_ids})
        echo(f"sweep: {len(points)} points ({len(points) - len(todo)} complete already), {len(todo)} to run on "
             f"{sweep.backend}")
        if sweep.backend == "ray":
            ran = _run_ray(todo, out, sweep, echo)
        else:
            ran = []
            for i, pt in enumerate(todo):
                echo(f"point {i + 1}/{len(todo)}: {pt['params']} seed {pt['seed']}")
                ran.append(run_point(pt, str(out)))
        for row in ran:
            rows[row["key"]] = row
        ordered = [{**rows[pt["key"]], "threads": pt["threads"]} for pt in points]  # last: earlier columns stay
        plot_sweep(ordered, [a.flag.lstrip("-") for a in axes], run.plot_dir())
        run.write_results({"study": study_name, "grid": config["grid"], "repeat": sweep.repeat,
                           "points": ordered}, ordered)
    return out, ordered


def _run_ray(points: list[dict], out: Path, sweep: SweepSpec, echo) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise FastablateError("--backend ray needs Ray: pip install \"fastablate[ray]\" (or pip install ray)") \
            from None
    ray.init(address=sweep.address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    pending = {ray.remote(num_cpus=pt["threads"], num_gpus=sweep.gpus_per_point)(run_point).remote(
        pt, str(out.resolve())): pt for pt in points}
    rows = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            pt = pending.pop(ref)
            rows.append(ray.get(ref))
            echo(f"point {len(rows)}/{len(points)} done: {pt['params']} seed {pt['seed']}: {rows[-1]['status']}")
    return rows


def _numeric(values: Sequence) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _log_scale(values: Sequence) -> bool:
    """Values spanning two decades or more, all positive."""
    return _numeric(values) and min(values) > 0 and max(values) / min(values) >= 100


def plot_sweep(rows: list[dict], params: list[str], directory: Path) -> list[Path]:
    """For each metric: a line plot with the spread over repeats for each swept option alone,
    and an annotated heatmap (mean over repeats) for each pair of swept options."""
    ok = [r for r in rows if r["status"] == "complete"]
    if not ok:
        return []
    reserved = {*params, "seed", "threads", "key", "status", "seconds", "error"}
    metrics = [k for k in ok[0] if k not in reserved and isinstance(ok[0][k], (int, float))]
    params = [p for p in params if len({json.dumps(r[p], default=str) for r in ok}) > 1]  # an axis of one value: none
    paths = []
    for metric in metrics:
        if len(params) == 1:
            paths.append(_single(ok, params[0], metric, directory))
        for a, b in itertools.permutations(params, 2):  # metric against a, one line (or bar) per value of b
            paths.append(_grouped(ok, a, b, metric, directory / f"lines-{metric}-{a}-by-{b}.png"))
        for a, b in itertools.combinations(params, 2):
            paths.append(_heatmap(ok, a, b, metric, directory / f"heatmap-{metric}-{a}-{b}.png"))
    return paths


def _values(rows: list[dict], p: str) -> list:
    return sorted({r[p] for r in rows}, key=_sort_key)


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _single(ok: list[dict], p: str, metric: str, directory: Path) -> Path:
    """metric against one option: a line with the min-max band over repeats for numbers, bars
    with min-max whiskers for categories (augment, init)."""
    xs = _values(ok, p)
    vals = [[r[metric] for r in ok if r[p] == x] for x in xs]
    means = [sum(v) / len(v) for v in vals]
    fig, ax = subplots(figsize=(max(5.5, 0.9 * len(xs) + 2), 3.8))
    if _numeric(xs):
        ax.plot(xs, means, "o-", label="mean over seeds")
        ax.fill_between(xs, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2, label="min-max")
        if _log_scale(xs):
            ax.set_xscale("log")
        ax.legend(fontsize=8)
        name = f"line-{metric}-{p}.png"
    else:
        err = [[m - min(v) for m, v in zip(means, vals)], [max(v) - m for m, v in zip(means, vals)]]
        ax.bar(range(len(xs)), means, yerr=err, capsize=3, color="tab:blue", alpha=0.8)
        for i, m in enumerate(means):
            ax.text(i, m, f"{m:.3g}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(xs)), [_fmt(x) for x in xs], rotation=25 if len(xs) > 4 else 0,
                      ha="right" if len(xs) > 4 else "center")
        name = f"bar-{metric}-{p}.png"
    ax.set(xlabel=p, ylabel=metric, title=f"{metric} vs {p}")
    return save(fig, directory / name)


def _grouped(ok: list[dict], a: str, b: str, metric: str, path: Path) -> Path:
    """metric against ``a``, one line per value of ``b`` (grouped bars when ``a`` is categorical);
    means over repeats."""
    xs, groups = _values(ok, a), _values(ok, b)
    fig, ax = subplots(figsize=(max(5.5, 0.9 * len(xs) * max(1, len(groups) / 2) + 2), 3.8))
    width = 0.8 / len(groups)
    for g, value in enumerate(groups):
        pts = [(i, x, [r[metric] for r in ok if r[a] == x and r[b] == value]) for i, x in enumerate(xs)]
        pts = [(i, x, sum(v) / len(v)) for i, x, v in pts if v]
        if _numeric(xs):
            ax.plot([x for _, x, _ in pts], [m for _, _, m in pts], "o-", label=f"{b}={_fmt(value)}")
        else:
            ax.bar([i - 0.4 + width * (g + 0.5) for i, _, _ in pts], [m for _, _, m in pts], width,
                   label=f"{b}={_fmt(value)}")
    if _numeric(xs) and _log_scale(xs):
        ax.set_xscale("log")
    if not _numeric(xs):
        ax.set_xticks(range(len(xs)), [_fmt(x) for x in xs], rotation=25 if len(xs) > 4 else 0,
                      ha="right" if len(xs) > 4 else "center")
    ax.set(xlabel=a, ylabel=metric, title=f"{metric} vs {a}, by {b} (mean over seeds)")
    ax.legend(fontsize=8)
    return save(fig, path)


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def _heatmap(rows: list[dict], a: str, b: str, metric: str, path: Path) -> Path:
    ys, xs = sorted({r[a] for r in rows}, key=_sort_key), sorted({r[b] for r in rows}, key=_sort_key)
    grid = [[math.nan] * len(xs) for _ in ys]
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            vals = [r[metric] for r in rows if r[a] == y and r[b] == x]
            if vals:
                grid[i][j] = sum(vals) / len(vals)
    fig, ax = subplots(figsize=(1.2 * len(xs) + 2.5, 0.8 * len(ys) + 1.8))
    shown = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i in range(len(ys)):
        for j in range(len(xs)):
            if not math.isnan(grid[i][j]):
                ax.text(j, i, f"{grid[i][j]:.4g}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i][j] < (max(v for r in grid for v in r if not math.isnan(v)) +
                                                        min(v for r in grid for v in r if not math.isnan(v))) / 2
                        else "black")
    ax.set_xticks(range(len(xs)), [_fmt(x) for x in xs])
    ax.set_yticks(range(len(ys)), [_fmt(y) for y in ys])
    ax.set(xlabel=b, ylabel=a, title=f"{metric} (mean over seeds)")
    fig.colorbar(shown, ax=ax)
    return save(fig, path)


def summary(rows: list[dict], params: Sequence[str]) -> str:
    """The terminal's table: one row per point."""
    keep = [k for k in rows[0] if k not in ("key",)] if rows else []
    return table([{k: r.get(k) for k in keep} for r in rows], keep)


__all__ = ["Axis", "SweepSpec", "make_points", "point_key", "run_point", "run_sweep", "summary"]
