"""Experiment tracking: a run logged to TensorBoard (``--tensorboard``) and MLflow (``--mlflow URI``).

Both are optional extras, off unless asked. TensorBoard writes event files into the run
directory (``tensorboard/``): scalars per epoch and per training step, the plots as images
and the config as hparams with the final metrics. MLflow logs the config as params, the
metrics per epoch, and the run directory as artifacts. A run inside a study or a sweep is
a child of the workflow's run (:func:`parent`).

The run directory is the record: a tracking backend that fails mid-run (a server that went
away) is dropped with one note, and the run goes on. One that cannot be reached at the start
is an error before anything is written.
"""
from __future__ import annotations

import contextvars
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fastablate.engines.core.spec import Text
from fastablate.errors import FastablateError, first_line, note

LOCAL_MLFLOW = "./mlruns"  # --mlflow without a URI: a local store (SQLite, artifacts beside) in this folder
EXPERIMENT = "fastablate"
_PARENT: contextvars.ContextVar[dict] = contextvars.ContextVar("fastablate_tracking_parent", default={})


def without_credentials(uri: str) -> str:
    """``uri`` without its user and password (``http://user:password@host`` gives ``http://host``),
    which go where MLflow's client reads them, ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD`` of this process: so no run.json, parameter, note or error holds
    them."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if colon:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return urlunsplit(parts._replace(netloc=host))


class TrackingURI(Text):
    """An MLflow URI or folder; credentials in it are taken out (:func:`without_credentials`)."""

    def __init__(self):
        super().__init__("URI")

    def normalize(self, value):
        return without_credentials(value) if isinstance(value, str) else value


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return out


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class _TensorBoard:
    name = "tensorboard"

    def __init__(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FastablateError("--tensorboard needs the tensorboard package: pip install "
                                  "'fastablate[tensorboard]'") from None
        self._writer_class, self.writer = SummaryWriter, None

    def start(self, run_dir: Path, name: str, config: dict) -> None:
        self.writer = self._writer_class(log_dir=str(run_dir / "tensorboard"))
        self.config = config

    def scalars(self, metrics: dict[str, float], step: int, prefix: str) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"{prefix}{k}", v, step)

    def finish(self, run_dir: Path, metrics: dict[str, float], status: str) -> None:
        from matplotlib import image

        for png in sorted((run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []:
            self.writer.add_image(f"plots/{png.stem}", image.imread(png)[..., :3], dataformats="HWC")
        self.writer.add_hparams(_flat(self.config), {f"final/{k}": v for k, v in metrics.items()} or {"final": 0.0},
                                run_name=".")
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, uri: str):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise FastablateError("--mlflow needs the mlflow package: pip install 'fastablate[mlflow]'") from None
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a server that is down: fail now
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        artifacts = None
        if ":" in uri:  # a server (http://, databricks, ...) or a store URI (sqlite:///...)
            self.uri = uri
        else:  # a folder: a SQLite store in it, the artifacts beside
            folder = Path(uri).resolve()
            self.uri, artifacts = f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()
        try:
            if artifacts:
                Path(uri).mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(tracking_uri=self.uri)
            found = self.client.get_experiment_by_name(EXPERIMENT)
            self.experiment = found.experiment_id if found else \
                self.client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        except Exception as e:
            raise FastablateError(f"--mlflow {uri}: cannot reach the tracking store: "
                                  f"{first_line(e) or type(e).__name__}") from None
        self.run_id = None

    def start(self, run_dir: Path, name: str, config: dict) -> None:
        parent = _PARENT.get().get(self.name)
        tags = {"mlflow.parentRunId": parent} if parent else {}
        self.run_id = self.client.create_run(self.experiment, run_name=name, tags=tags).info.run_id
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def scalars(self, metrics: dict[str, float], step: int, prefix: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{prefix}{k}".replace("/", "."), v, now, step)
                                                    for k, v in metrics.items()])

    def finish(self, run_dir: Path, metrics: dict[str, float], status: str) -> None:
        if metrics:
            self.scalars(metrics, 0, "final.")
        self.client.log_artifacts(self.run_id, str(run_dir))
        self.client.set_terminated(self.run_id, status=status)


class Tracker:
    """The backends a run logs to; each call goes to every backend still working."""

    def __init__(self, tensorboard: bool = False, mlflow: str | None = None):
        self.backends = ([_TensorBoard()] if tensorboard else []) + ([_MLflow(mlflow)] if mlflow else [])
        self.run_dir: Path | None = None

    def __bool__(self) -> bool:
        return bool(self.backends)

    def _each(self, what: str, *args) -> None:
        for b in list(self.backends):
            try:
                getattr(b, what)(*args)
            except Exception as e:
                self.backends.remove(b)
                where = f"; the run directory {self.run_dir} is complete" if self.run_dir else ""
                note(f"{b.name}: logging stopped ({type(e).__name__}: {first_line(e)})"
                     f"{where}; nothing more is logged there")

    def start(self, run_dir: Path, name: str, config: dict) -> None:
        self.run_dir = Path(run_dir)
        self._each("start", self.run_dir, name, config)

    def epoch(self, row: dict, epoch: int) -> None:
        """One training epoch's metrics (metrics.csv's row)."""
        self._each("scalars", _numbers({k: v for k, v in row.items() if k != "epoch"}), epoch, "epoch/")

    def step(self, metrics: dict, step: int) -> None:
        """One training step's loss and learning rate."""
        self._each("scalars", _numbers(metrics), step, "step/")

    def finish(self, metrics: dict | None = None, status: str = "FINISHED") -> None:
        if self.run_dir is not None:
            self._each("finish", self.run_dir, _numbers(metrics or {}), status)

    @property
    def ids(self) -> dict[str, str]:
        """The backends' run ids (a workflow's, for its children)."""
        return {b.name: b.run_id for b in self.backends if getattr(b, "run_id", None)}


@contextmanager
def parent(ids: dict[str, str]) -> Iterator[None]:
    """Runs started inside the block are children of the run with these ids."""
    token = _PARENT.set(ids)
    try:
        yield
    finally:
        _PARENT.reset(token)


@contextmanager
def tracked(tracker: Tracker, out: Path, config: dict) -> Iterator[None]:
    """A workflow's own tracking run around its parts or points, which log as its children."""
    if not tracker:
        yield
        return
    tracker.start(out, out.name, config)
    try:
        with parent(tracker.ids):
            yield
    except BaseException:
        tracker.finish(status="FAILED")
        raise
    tracker.finish()
