"""The one writer of a run directory.

``run.json`` first (command, config, versions, device, seed, status "running"), then
results as they are produced, each file written atomically; ``finish`` marks the run
"complete" or "failed" with its timings. ``results.json``/``results.csv`` appear only when
a run has finished them, so a failed run never presents a half-written result.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable

from fastablate.files import atomic_write_text


def default_out(command: str) -> Path:
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def versions() -> dict[str, str]:
    import numpy
    import torch
    import torchvision

    import fastablate
    from fastablate.ops import kernel_status, load_error

    status = kernel_status()
    kernels = "; ".join(f"{op}: {','.join(d for d, ok in devs.items() if ok) or 'reference'}"
                        for op, devs in status.items())
    if load_error():
        kernels += f" (compiled kernels not loaded: {load_error()})"
    return {"fastablate": fastablate.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "kernels": kernels}


def _jsonable(obj: Any) -> Any:
    """Plain JSON values; a non-finite float becomes None (null): NaN and Infinity are not JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # 0-d tensors and numpy scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, rows: Iterable[dict]) -> Path:
    """Rows as CSV; the columns are every key in order of first appearance."""
    rows = [_jsonable(r) for r in rows]
    buf = io.StringIO()
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


class RunDir:
    """A run's output directory."""

    RESULT_FILES = ("results.json", "results.csv")

    def __init__(self, out: str | os.PathLike, command: str, config: dict, *, device: str, seed: int):
        self.path = Path(out)
        self.command, self.config, self.device, self.seed = command, config, device, seed
        self.started = time.time()
        self.timings: dict[str, float] = {}

    def start(self, resume: bool = False) -> "RunDir":
        """Create the directory and write run.json; a fresh run clears stale results first."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            for name in self.RESULT_FILES:
                (self.path / name).unlink(missing_ok=True)
        self._write_run("running")
        return self

    def _write_run(self, status: str, error: str | None = None) -> None:
        info = {"command": self.command, "status": status, "config": self.config, "device": self.device,
                "seed": self.seed, "versions": versions(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
                "timings": self.timings}
        if error:
            info["error"] = error
        self.write_json("run.json", info)

    def write_json(self, name: str, obj: Any) -> Path:
        return write_json(self.path / name, obj)

    def write_csv(self, name: str, rows: Iterable[dict]) -> Path:
        return write_csv(self.path / name, rows)

    def write_results(self, results: dict, rows: Iterable[dict]) -> None:
        """results.csv, then results.json: the json's presence means the run's result is whole."""
        self.write_csv("results.csv", rows)
        self.write_json("results.json", results)

    def plot_dir(self) -> Path:
        (self.path / "plots").mkdir(parents=True, exist_ok=True)
        return self.path / "plots"

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Marks the run complete, or failed with the exception (which propagates)."""
        self.finish(error=f"{exc_type.__name__}: {exc}" if exc_type else None)

    def finish(self, error: str | None = None) -> None:
        self.timings["total_s"] = round(time.time() - self.started, 3)
        self._write_run("failed" if error else "complete", error)
