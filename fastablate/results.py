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
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable


def default_out(command: str) -> Path:
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def versions() -> dict[str, str]:
    import numpy
    import torch
    import torchvision

    import fastablate
    from fastablate import _ext

    return {"fastablate": fastablate.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(),
            "kernels": ",".join(_ext.kernel_backends()) or f"none ({_ext.load_error()})"}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # 0-d tensors and numpy scalars
        return obj.item()
    return obj


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
        path = self.path / name
        atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")
        return path

    def write_csv(self, name: str, rows: Iterable[dict]) -> Path:
        rows = [_jsonable(r) for r in rows]
        buf = io.StringIO()
        fields: list[str] = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        path = self.path / name
        atomic_write_text(path, buf.getvalue())
        return path

    def write_results(self, results: dict, rows: Iterable[dict]) -> None:
        """results.csv, then results.json: the json's presence means the run's result is whole."""
        self.write_csv("results.csv", rows)
        self.write_json("results.json", results)

    def plot_path(self, name: str) -> Path:
        (self.path / "plots").mkdir(parents=True, exist_ok=True)
        return self.path / "plots" / f"{name}.png"

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Marks the run complete, or failed with the exception (which propagates)."""
        self.finish(error=f"{exc_type.__name__}: {exc}" if exc_type else None)

    def finish(self, error: str | None = None) -> None:
        self.timings["total_s"] = round(time.time() - self.started, 3)
        self._write_run("failed" if error else "complete", error)
