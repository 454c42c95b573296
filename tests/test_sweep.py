"""Sweeps: points from grids and seeds, checked before anything runs, resumable, failures
recorded, heatmaps; the Ray backend gives the local backend's numbers."""
import json

import pytest
import torch
from click.testing import CliRunner

from fastablate.cli import cli
from fastablate.engines.workflows.sweep import Axis, make_points

BASE = ["--", "train", "--model", "resnet8", "--dataset", "synthetic", "--limit", "40", "--batch-size", "20",
        "--epochs", "1", "--device", "cpu"]


def sweep(*args, code=0):
    r = CliRunner().invoke(cli, ["sweep", *[str(a) for a in args]])
    assert r.exit_code == code, (r.output, r.exception)
    return r


def test_points_keys_and_seeds():
    axes = [Axis("spec", "lr", "--lr", (0.1, 0.2)), Axis("setup", "batch_size", "--batch-size", (32,))]
    pts = make_points("train", {"seed": 5}, {"epochs": 1}, axes, repeat=3, threads=2)
    assert len(pts) == 6 and [p["seed"] for p in pts[:3]] == [5, 6, 7]
    assert pts[0]["params"] == {"lr": 0.1, "batch-size": 32} and pts[0]["spec"]["lr"] == 0.1
    assert len({p["key"] for p in pts}) == 6
    again = make_points("train", {"seed": 5, "out": "elsewhere", "workers": 3}, {"epochs": 1}, axes, repeat=3,
                        threads=2)
    assert [p["key"] for p in again] == [p["key"] for p in pts]  # where and how fast do not make another point
    # Another thread count may round differently: another point.
    one = make_points("train", {"seed": 5}, {"epochs": 1}, axes, repeat=3, threads=1)
    assert not {p["key"] for p in one} & {p["key"] for p in pts} and one[0]["threads"] == 1


@pytest.mark.slow
def test_sweep_grid_resume_extend_and_plots(tmp_path):
    out = tmp_path / "s"
    r = sweep("--grid", "lr=0.05,0.2", "--grid", "batch-size=10,20", "--out", out, *BASE)
    assert "4 to run" in r.output
    res = json.loads((out / "results.json").read_text())
    assert [(p["lr"], p["batch-size"]) for p in res["points"]] == [(0.05, 10), (0.05, 20), (0.2, 10), (0.2, 20)]
    assert all(p["status"] == "complete" and 0 <= p["accuracy"] <= 1 for p in res["points"])
    point = out / "points" / res["points"][0]["key"]
    assert json.loads((point / "run.json").read_text())["config"]["lr"] == 0.05 and (point / "model.pt").is_file()
    assert (out / "plots" / "heatmap-accuracy-lr-batch-size.png").stat().st_size > 5000
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("lr,batch-size,seed,key,status,seconds,accuracy,loss") and len(rows) == 5
    r = sweep("--grid", "lr=0.05,0.2,0.4", "--grid", "batch-size=10,20", "--out", out, *BASE)
    assert "6 points (4 complete already), 2 to run" in r.output
    res2 = json.loads((out / "results.json").read_text())
    assert res2["points"][:2] == res["points"][:2]  # finished points are not rerun


@pytest.mark.slow
def test_sweep_repeat_line_plot_log_axis(tmp_path):
    out = tmp_path / "r"
    sweep("--grid", "lr=0.001,0.01,0.1", "--repeat", "2", "--out", out, *BASE)
    res = json.loads((out / "results.json").read_text())
    assert [p["seed"] for p in res["points"]] == [0, 1] * 3
    assert (out / "plots" / "line-accuracy-lr.png").is_file()


@pytest.mark.slow
def test_init_axis_categories_bars_and_grouped_lines(tmp_path, trained_resnet8):
    """One axis holds a checkpoint and a fresh start; augment is categorical: bars, and lines
    of each option grouped by the other; the train metrics are in the points."""
    out = tmp_path / "g"
    sweep("--grid", f"init=none,{trained_resnet8}", "--grid", "augment=crop;crop,flip", "--out", out, *BASE)
    res = json.loads((out / "results.json").read_text())
    assert [(p["init"], p["augment"]) for p in res["points"]] == [
        ("none", "crop"), ("none", "crop,flip"), (str(trained_resnet8), "crop"), (str(trained_resnet8), "crop,flip")]
    assert all(0 <= p["train_accuracy"] <= 1 and p["train_loss"] > 0 for p in res["points"])
    point = out / "points" / res["points"][2]["key"]
    assert json.loads((point / "run.json").read_text())["init"] == f"checkpoint {trained_resnet8}"
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"lines-accuracy-init-by-augment.png", "lines-accuracy-augment-by-init.png",
            "heatmap-accuracy-init-augment.png"} <= plots
    one = tmp_path / "one"
    sweep("--grid", "augment=crop;flip;crop,flip", "--out", one, *BASE)
    assert (one / "plots" / "bar-accuracy-augment.png").is_file()


def test_failing_point_is_recorded_and_the_others_run(tmp_path):
    out = tmp_path / "f"
    r = CliRunner().invoke(cli, ["sweep", "--grid", "dataset=synthetic,imagefolder", "--out", str(out), *BASE])
    assert r.exit_code == 1, r.output
    res = json.loads((out / "results.json").read_text())
    ok, failed = res["points"]
    assert ok["status"] == "complete" and failed["status"] == "failed"
    assert failed["error"] == "dataset imagefolder needs --data-dir"
    assert "1 of 2 points failed; first: dataset imagefolder needs --data-dir" in r.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "complete"  # the sweep itself finished


@pytest.mark.parametrize("args, message", [
    (["--grid", "lr=0.1,nan"], "--lr 'nan' (in --grid lr): is not a finite number"),
    (["--grid", "bogus=1"], "--grid bogus: train has no option 'bogus'"),
    (["--grid", "lr"], "--grid 'lr' is not OPTION=VALUE,VALUE"),
    (["--grid", "out=a,b"], "--grid out: --out is not an option train can sweep"),
    (["--grid", "warmup=0.1,0.2"], "grid point warmup=0.1: --warmup applies to --schedule onecycle"),
    (["--grid", "lr=0.1", "--address", "auto"], "--address applies to --backend ray"),
    (["--grid", "lr=0.1", "--repeat", "0"], "--repeat '0': must be in [1, 1000]"),
])
def test_bad_sweeps_write_nothing(args, message, tmp_path):
    r = sweep(*args, "--out", tmp_path / "o", *BASE, code=2)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_sweep_needs_a_base_command():
    assert "needs a base command" in sweep("--grid", "lr=0.1", code=2).stderr


@pytest.mark.slow
def test_ray_backend_equals_local(tmp_path):
    """The same defaults on both backends: the same points, keys and numbers."""
    pytest.importorskip("ray")
    common = ["--grid", "lr=0.05,0.2"]
    sweep(*common, "--out", tmp_path / "local", *BASE)
    sweep(*common, "--backend", "ray", "--out", tmp_path / "ray", *BASE)
    import ray
    ray.shutdown()
    local, remote = (json.loads((tmp_path / d / "results.json").read_text())["points"] for d in ("local", "ray"))
    strip = [{k: v for k, v in p.items() if k != "seconds"} for p in local]
    assert strip == [{k: v for k, v in p.items() if k != "seconds"} for p in remote]
    assert all((tmp_path / "ray" / "points" / p["key"] / "model.pt").is_file() for p in remote)
    assert all(p["threads"] == torch.get_num_threads() for p in remote)
