"""``fastablate compare RUN_DIR...``: training runs side by side.

Reads each finished ``train`` run (its run.json and results.json) and writes, into its own
run directory:

- ``plots/curves.png``: loss and accuracy per epoch of every run, overlaid; train solid,
  validation dashed, test dotted (with a validation split the test split is one point, at
  the end);
- ``plots/final.png``: the final test accuracy of each run, and its best, as bars;
- ``results.json`` and ``results.csv``: one row per run with its final and best metrics, the
  epoch of the best, the kept epoch and the training time, beside the options that differ
  between the runs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from fastablate.engines.core.runtime import table
from fastablate.engines.core.spec import List, Spec, Text, option
from fastablate.errors import FastablateError, note
from fastablate.plots import colors, save, subplots
from fastablate.rundir import VOLATILE, RunDir, default_out, read_run

SETS = {"train": "-", "val": "--", "test": ":"}


@dataclass(frozen=True)
class CompareSpec(Spec):
    names: Optional[tuple[str, ...]] = option(None, "A name per run, in order, e.g. scratch,imagenet [default: the "
                                                    "folders' names].", type=List(Text("NAME")))
    out: Optional[str] = option(None, "Output directory [default: runs/compare-<timestamp>].", type=Text("DIR"))
    force: bool = option(False, "Replace what --out holds instead of refusing.")


@dataclass
class Run:
    name: str
    path: Path
    config: dict
    document: dict
    seconds: float | None

    @property
    def history(self) -> list[dict]:
        return self.document.get("history", [])


def read_runs(dirs: Sequence[str], names: Sequence[str] | None = None) -> list[Run]:
    """The finished train runs in ``dirs`` (one that failed or is running is left out, with a
    note); a folder that holds no train run is an error naming it."""
    if len(dirs) < 1:
        raise FastablateError("compare needs at least one RUN_DIR (a finished fastablate train run)")
    given = list(names) if names else None
    if given is not None and len(given) != len(dirs):
        raise FastablateError(f"--names gives {len(given)} names for {len(dirs)} runs: give one per run")
    names = given or [Path(d).resolve().name for d in dirs]
    runs, unfinished = [], []
    for d, name in zip(dirs, names):
        info = read_run(d)
        if info is None or info.get("command") != "train":
            raise FastablateError(f"{d}: not a fastablate train run (no run.json of train)")
        if info.get("status") != "complete":  # a sweep's failed point: left out, said
            unfinished.append(f"{d} ({info.get('status')}{': ' + info['error'] if info.get('error') else ''})")
            continue
        try:
            document = json.loads((Path(d) / "results.json").read_text())
        except (OSError, ValueError):
            raise FastablateError(f"{d}: its results.json is missing or unreadable") from None
        runs.append(Run(name, Path(d), info.get("config", {}), document, info.get("timings", {}).get("total_s")))
    if not runs:
        raise FastablateError(f"compare: none of the runs completed: {'; '.join(unfinished)}")
    if unfinished:
        note(f"compare: left out {len(unfinished)} run(s) that did not complete: {'; '.join(unfinished)}")
    if given is None:  # named by what differs (a sweep's points), when that tells them apart
        options = differing(runs)
        labels = [" ".join(f"{o}={_shown(r.config.get(o))}" for o in options) for r in runs]
        if options and len(set(labels)) == len(labels):
            for r, label in zip(runs, labels):
                r.name = label
    if len({r.name for r in runs}) != len(runs):
        raise FastablateError(f"two runs share the name {', '.join(r.name for r in runs)}; give --names")
    return runs


def _shown(value) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _best(history: list[dict], split: str) -> tuple[float | None, int | None]:
    rows = [r for r in history if isinstance(r.get(f"{split}_accuracy"), (int, float))]
    if not rows:
        return None, None
    best = max(rows, key=lambda r: r[f"{split}_accuracy"])  # the first epoch of the highest
    return best[f"{split}_accuracy"], best["epoch"]


def differing(runs: list[Run]) -> list[str]:
    """The options whose values differ between the runs (what the comparison is about)."""
    keys = sorted({k for r in runs for k in r.config} - set(VOLATILE))
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


def rows(runs: list[Run]) -> list[dict]:
    options = differing(runs)
    out = []
    for r in runs:
        last = r.history[-1] if r.history else {}
        best_val, best_val_epoch = _best(r.history, "val")
        row = {"run": r.name, **{o: r.config.get(o) for o in options},
               "test_accuracy": r.document.get("accuracy"), "test_loss": r.document.get("loss"),
               "train_accuracy": last.get("train_accuracy"), "train_loss": last.get("train_loss")}
        if best_val is not None:  # selection by validation: the test split is seen once, at the end
            row.update(val_accuracy=last.get("val_accuracy"), best_val_accuracy=best_val, best_val_epoch=best_val_epoch)
        else:
            best_test, best_test_epoch = _best(r.history, "test")
            row.update(best_test_accuracy=best_test, best_test_epoch=best_test_epoch)
        row.update(epochs=len(r.history), kept_epoch=(r.document.get("kept") or {}).get("epoch", len(r.history)),
                   seconds=r.seconds, dir=str(r.path))
        out.append(row)
    return out


def plot_curves(runs: list[Run], path: Path) -> Path:
    fig, (a, b) = subplots(1, 2, figsize=(11, 4.2))
    palette = colors()
    for i, r in enumerate(runs):
        color = palette[i % len(palette)]
        for split, style in SETS.items():
            pts = [x for x in r.history if isinstance(x.get(f"{split}_accuracy"), (int, float))]
            if not pts:
                continue
            kw = dict(color=color, ls=style, marker="o" if len(pts) == 1 else None, ms=4, label=f"{r.name} {split}")
            a.plot([x["epoch"] for x in pts], [x[f"{split}_loss"] for x in pts], **kw)
            b.plot([x["epoch"] for x in pts], [x[f"{split}_accuracy"] for x in pts], **kw)
    a.set(xlabel="epoch", ylabel="loss (cross-entropy)", title="loss")
    b.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title="accuracy")
    for ax in (a, b):
        ax.xaxis.get_major_locator().set_params(integer=True)
    b.legend(fontsize=7, ncol=max(1, len(runs) // 4), loc="lower right")
    return save(fig, path, dpi=120)


def plot_final(table_rows: list[dict], path: Path) -> Path:
    fig, ax = subplots(figsize=(1.0 * len(table_rows) + 3, 3.8))
    xs = range(len(table_rows))
    ax.bar([x - 0.2 for x in xs], [r["test_accuracy"] for r in table_rows], 0.4, label="final test")
    best = [r["best_val_accuracy"] if "best_val_accuracy" in r else r["best_test_accuracy"] for r in table_rows]
    ax.bar([x + 0.2 for x in xs], best, 0.4, label="best epoch (val, else test)")
    for x, r in zip(xs, table_rows):
        ax.text(x - 0.2, r["test_accuracy"], f"{r['test_accuracy']:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [r["run"] for r in table_rows], rotation=20 if len(table_rows) > 4 else 0, ha="right"
                  if len(table_rows) > 4 else "center")
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title="final and best accuracy per run")
    ax.legend(fontsize=8)
    return save(fig, path)


def run_compare(dirs: Sequence[str], spec: CompareSpec) -> tuple[Path, list[dict]]:
    """Compare the train runs in ``dirs``; returns the output folder and the table's rows."""
    names = [n.strip() for n in spec.names] if spec.names else None
    runs = read_runs(dirs, names)
    out = Path(spec.out or default_out("compare"))
    inputs = [(f"RUN_DIR {d}", str(Path(d) / "results.json")) for d in dirs]
    config = {"runs": [str(Path(d).resolve()) for d in dirs], "names": [r.name for r in runs]}
    table_rows = rows(runs)
    with RunDir(out, "compare", config, device="-", seed=0).start(force=spec.force, inputs=inputs) as run:
        plot_curves(runs, run.plot_dir() / "curves.png")
        plot_final(table_rows, run.plot_dir() / "final.png")
        run.write_results({"runs": table_rows, "differing": differing(runs)}, table_rows)
    return out, table_rows


def summary(table_rows: list[dict]) -> str:
    shown = [k for k in table_rows[0] if k != "dir"]
    return table([{k: r.get(k) for k in shown} for r in table_rows], shown)


__all__ = ["CompareSpec", "read_runs", "run_compare", "summary"]
