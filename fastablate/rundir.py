"""The one writer of a run directory.

``run.json`` first (command, config, versions, device, seed, status "running"), then
results as they are produced, each file written atomically; ``finish`` marks the run
"complete" or "failed" with its timings. ``results.json``/``results.csv`` appear only when
a run has finished them, so a failed run never presents a half-written result.
"""
from __future__ import annotations

import csv
import fcntl
import fnmatch
import io
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from fastablate.errors import FastablateError
from fastablate.files import TMP_SUFFIX, atomic_write_text, remove_stale_temporaries


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


def jsonable(obj: Any) -> Any:
    """Plain JSON values; a non-finite float becomes None (null): NaN and Infinity are not JSON."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # 0-d tensors and numpy scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, rows: Iterable[dict]) -> Path:
    """Rows as CSV; the columns are every key in order of first appearance."""
    rows = [jsonable(r) for r in rows]
    buf = io.StringIO()
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


RUN_FILE = "run.json"
# What runs write into their directory; replacing a run removes these and nothing else.
OUTPUTS = ("run.json", "results.json", "results.csv", "metrics.csv", "model.pt", "last.pt", "plots", "adversarial*.pt",
           "trajectory*.pt", "tensorboard")
# Options that do not change what a run computes, only where it writes (and logs) and how fast:
# a rerun with others is the same run, a sweep point with others the same point.
TRACKING = ("tensorboard", "mlflow")  # where a run is logged
VOLATILE = ("out", "workers", "device", "force", *TRACKING)


def read_run(folder: str | os.PathLike) -> dict | None:
    """The run.json of the run in ``folder``, or None when there is none or it cannot be read."""
    try:
        info = json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def finished(folder: str | os.PathLike, config: dict | None = None, inputs: dict | None = None) -> dict | None:
    """The results.json of the complete run in ``folder`` (made with ``config``, and from inputs
    with these fingerprints, when given), or None."""
    info = read_run(folder)
    if info is None or info.get("status") != "complete" or (config is not None and
                                                            info.get("config") != jsonable(config)) or \
            (inputs is not None and info.get("inputs", {}) != inputs):
        return None
    try:
        return json.loads((Path(folder) / "results.json").read_text())
    except (OSError, ValueError):
        return None


class RunDir:
    """A run's output directory, locked while a process writes it.

    Ownership: a fresh run may use a new or empty folder, or replace a run of the same
    command and options (a rerun); a folder that holds another run, or files that are not a
    run, is refused unless ``force``. ``resume`` continues the run in the folder. Inputs
    (``--weights`` ...) never lie among the files a run writes or replaces.
    """

    def __init__(self, out: str | os.PathLike, command: str, config: dict, *, device: str, seed: int,
                 info: dict | None = None):
        self.path = Path(out)
        self.command, self.config, self.device, self.seed = command, config, device, seed
        self.info = info or {}  # what the study adds to run.json
        self.started = time.time()
        self.timings: dict[str, float] = {}
        self._lock_fd: int | None = None

    def start(self, *, resume: bool = False, force: bool = False,
              inputs: Sequence[tuple[str, str]] = ()) -> "RunDir":
        """Take the folder (see the class) and write run.json."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise FastablateError(f"--out {str(path)!r} is a file, not a folder")
        self._check_inputs(inputs)
        created = False
        if not path.exists():
            try:
                path.mkdir(parents=True)
                created = True
            except FileExistsError:
                pass
            except OSError as e:
                raise FastablateError(f"--out {str(path)!r}: cannot create it ({e.strerror})") from None
        try:
            self._lock()
        except BaseException:
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise
        try:
            if not created:
                self._claim(resume, force)
            for folder in (path, path / "plots"):
                remove_stale_temporaries(folder)
            self._write_run("running")
        except BaseException:
            self._unlock()
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise
        return self

    def _check_inputs(self, inputs: Sequence[tuple[str, str]]) -> None:
        written = [self.path / name for name in OUTPUTS if "*" not in name]
        for flag, value in inputs:
            p = Path(value).resolve()
            if any(p == w.resolve() or w.resolve() in p.parents for w in written) or (
                    p.parent == self.path.resolve() and fnmatch.fnmatch(p.name, "adversarial*.pt")):
                raise FastablateError(f"{flag} {value} is a file this run writes into --out {str(self.path)!r}; "
                                      "choose another --out (inputs are never overwritten)")

    def _lock(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise FastablateError(f"--out {str(self.path)!r}: cannot open it ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise FastablateError(f"--out {str(self.path)!r} is being written by another fastablate process; wait for "
                                  "it to finish or choose another --out") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _claim(self, resume: bool, force: bool) -> None:
        """Check that this run may use the existing folder; replacing a run removes its outputs."""
        where = f"--out {str(self.path)!r}"
        old = read_run(self.path)
        if old is None and (self.path / RUN_FILE).is_file() and not force:
            raise FastablateError(f"{where} holds a run.json that cannot be read; --force replaces it")
        if resume:
            if old is None or old.get("command") != self.command:
                raise FastablateError(f"--resume: {where} holds no {self.command} run to continue")
            return
        if old is None:
            others = [p.name for p in self.path.iterdir() if not p.name.endswith(TMP_SUFFIX)]
            if others and not force:
                shown = ", ".join(sorted(others)[:3]) + (" ..." if len(others) > 3 else "")
                raise FastablateError(f"{where} holds files that are not a fastablate run ({shown}); choose a new or "
                                      "empty folder, or --force")
            return
        diff = _config_diff(old.get("config", {}), jsonable(self.config))
        if (old.get("command") != self.command or diff) and not force:
            what = f"a {old.get('status', '')} {old.get('command')} run".replace("  ", " ")
            detail = f" with other options ({', '.join(diff[:4])})" if old.get("command") == self.command else ""
            raise FastablateError(f"{where} holds {what}{detail}; choose another --out, or --force to replace it")
        for pattern in OUTPUTS:
            for p in self.path.glob(pattern):
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    def _write_run(self, status: str, error: str | None = None) -> None:
        info = {"command": self.command, "status": status, "config": self.config, "device": self.device,
                "seed": self.seed, "versions": versions(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
                "timings": self.timings, **self.info}
        if error:
            info["error"] = error
        self.write_json(RUN_FILE, info)

    def write_json(self, name: str, obj: Any) -> Path:
        return _writing(write_json, self.path / name, obj)

    def write_csv(self, name: str, rows: Iterable[dict]) -> Path:
        return _writing(write_csv, self.path / name, rows)

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
        try:
            self._write_run("failed" if error else "complete", error)
        except FastablateError:
            if not error:  # a failing run keeps its own error; a disk that fails at the end is one
                raise
        finally:
            self._unlock()


def _config_diff(old: dict, new: dict) -> list[str]:
    keys = (set(old) | set(new)) - set(VOLATILE)
    return sorted(k for k in keys if old.get(k) != new.get(k))


def _writing(write, path: Path, obj) -> Path:
    """``write(path, obj)``; a failing disk is one error line naming the file."""
    try:
        return write(path, obj)
    except OSError as e:
        raise FastablateError(f"cannot write {path}: {e.strerror or e}") from None
