"""Tracking: TensorBoard event files in the run directory, MLflow against a local store and a
real tracking server, child runs of a sweep, an unreachable server (an error before any file)
and one that goes away mid-run (the run directory stays complete)."""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from click.testing import CliRunner

from fastablate.cli import cli
from fastablate.engines.core import tracking

TRAIN = ["train", "--model", "resnet8", "--dataset", "synthetic", "--limit", "40", "--batch-size", "20",
         "--epochs", "2"]
needs_mlflow = pytest.mark.skipif(not importlib.util.find_spec("mlflow"), reason="the mlflow extra is not installed")


def run(*args, code=0):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == code, (r.output, r.exception)
    return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fastablate")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("tensorboard"), reason="the tensorboard extra is not installed")
def test_tensorboard_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run(*TRAIN, "--tensorboard", "--out", out)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("epoch/test_accuracy")] == [1, 2]
    assert [e.step for e in events.Scalars("step/train_loss")] == [1, 2, 3, 4]  # 2 steps of 20 images per epoch
    final = json.loads((out / "results.json").read_text())["accuracy"]
    assert events.Scalars("final/accuracy")[0].value == pytest.approx(final)
    assert "plots/curves" in events.Tags()["images"]
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(events.PluginTagToContent("hparams"))


@pytest.mark.slow
@needs_mlflow
def test_mlflow_local_store_and_sweep_children(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(*TRAIN, "--mlflow", "--out", "one")  # the flag alone: ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client, runs = _runs(uri)
    (only,) = runs
    assert only.info.run_name == "one" and only.info.status == "FINISHED"
    assert only.data.params["model"] == "resnet8" and only.data.params["epochs"] == "2"
    assert [m.step for m in client.get_metric_history(only.info.run_id, "epoch.test_accuracy")] == [1, 2]
    assert {"model.pt", "results.json", "run.json"} <= {a.path for a in client.list_artifacts(only.info.run_id)}
    run("sweep", "--grid", "lr=0.05,0.2", "--out", "sw", "--", *TRAIN[:-2], "--epochs", "1", "--mlflow", "store")
    client, runs = _runs(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    sweep = [r for r in runs if r.info.run_name == "sw"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep[0].info.run_id]
    assert len(runs) == 3 and len(children) == 2


def test_unknown_tracking_extras_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    out = tmp_path / "run"
    r = run(*TRAIN, "--mlflow", "store", "--out", out, code=2)
    assert "Error: --mlflow needs the mlflow package: pip install 'fastablate[mlflow]'" in r.output
    assert not out.exists()


@pytest.fixture
def server(tmp_path):
    """A real MLflow tracking server (SQLite backend) on a free port; stopped afterwards."""
    exe = shutil.which("mlflow")
    if exe is None:
        pytest.skip("the mlflow extra is not installed")
    port = _free_port()
    proc = subprocess.Popen([exe, "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--default-artifact-root", (tmp_path / "artifacts").as_uri(), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("mlflow server exited")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield uri, proc
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
@needs_mlflow
def test_mlflow_server(server, tmp_path, monkeypatch):
    uri, proc = server
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    # Credentials in the URI go to MLflow's variables; nothing that is recorded holds them.
    run(*TRAIN, "--mlflow", uri.replace("http://", "http://ada:s3cr%40t@"), "--out", tmp_path / "a")
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ada" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cr@t"
    client, (logged,) = _runs(uri)
    assert logged.info.status == "FINISHED" and logged.data.metrics["final.accuracy"] >= 0
    assert logged.data.params["mlflow"] == uri and "s3cr" not in json.dumps(logged.data.params)
    assert "s3cr" not in (tmp_path / "a" / "run.json").read_text()
    assert len(client.get_metric_history(logged.info.run_id, "step.train_loss")) == 4
    # The server goes away after the first epoch: the run goes on, its directory complete, with a note.
    original = tracking._MLflow.scalars
    calls = []

    def scalars(self, metrics, step, prefix):
        calls.append(prefix)
        if prefix == "epoch/" and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        return original(self, metrics, step, prefix)
    monkeypatch.setattr(tracking._MLflow, "scalars", scalars)
    out = tmp_path / "b"
    r = run(*TRAIN, "--mlflow", uri, "--out", out)
    assert "mlflow: logging stopped" in r.output and f"the run directory {out} is complete" in r.output
    assert json.loads((out / "run.json").read_text())["status"] == "complete" and (out / "model.pt").is_file()
    # A server that is not there: one error line, nothing written.
    gone = tmp_path / "c"
    r = run(*TRAIN, "--mlflow", uri, "--out", gone, code=2)
    assert r.output.startswith(f"Error: --mlflow {uri}: cannot reach the tracking store") and not gone.exists()


@pytest.mark.slow
@needs_mlflow
def test_study_parts_are_child_runs(tmp_path):
    tiny = ["--dataset", "synthetic", "--limit", "60", "--models", "resnet8,plain8", "--epochs", "1", "--samples", "2"]
    run("study", *tiny, "--only", "train,eval,lesion", "--mlflow", tmp_path / "store", "--out", tmp_path / "s")
    client, runs = _runs(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    (study,) = [r for r in runs if r.info.run_name == "s"]
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == study.info.run_id}
    assert children == {"train-resnet8", "train-plain8", "eval", "lesion"} and study.info.status == "FINISHED"


@needs_mlflow
def test_credentials_in_the_uri_never_reach_a_line_or_a_record(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    port = _free_port()  # nothing listens there
    r = run(*TRAIN, "--mlflow", f"http://ada:s3cret@127.0.0.1:{port}", "--out", tmp_path / "o", code=2)
    assert r.output.startswith(f"Error: --mlflow http://127.0.0.1:{port}: cannot reach the tracking store")
    assert "s3cret" not in r.output and not (tmp_path / "o").exists()
    from fastablate.engines.core.setup import Setup
    setup = Setup(mlflow="https://ada:s3cret@example.org/mlflow")
    assert setup.mlflow == "https://example.org/mlflow" and "s3cret" not in json.dumps(setup.to_dict())
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
