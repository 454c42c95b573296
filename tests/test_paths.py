"""Paths (Veit et al. 2016, Sec. 6): exact distributions, shared-forward path gradients equal to
the explicitly masked networks, the effective range, the CLI and its bad input."""
import contextlib
import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_near_oracle, float64, randomize_bn

from fastablate.cli import cli
from fastablate.engines.studies.paths import (PathsResult, distribution, effective_range, naive_gradients,
                                              shared_gradients)
from fastablate.models import build_model, save_checkpoint
from fastablate.modes import affine_batchnorm
from fastablate.units import units

MODEL_FILES = Path(__file__).parent / "models"
VIT = "timm:vit_tiny_patch16_224,patch_size=8,depth=2,embed_dim=48,num_heads=2"


def test_distribution_is_exact():
    d = distribution(54)
    assert [x["paths"] for x in d[:3]] == [1, 54, 1431] and sum(x["paths"] for x in d) == 2 ** 54
    assert d[27]["paths"] == math.comb(54, 27) == 1946939425648112  # above 2^53: still exact
    assert math.isclose(sum(x["fraction"] for x in d), 1.0)


@pytest.mark.numerics
# The deeper nets with random BatchNorm statistics are chaotic in float32: a rounding difference
# flips a ReLU near zero, and the gradient norm jumps (ResNet-18: inputs moved by 1e-6 move it by
# 4.5e-5 relative, by 1e-7 only 2.5e-9). Two float32 paths then differ by whichever ReLUs flip, on
# any CPU; so they are compared in float64, where the paths agree to 1e-15.
@pytest.mark.parametrize("name, dtype", [("resnet20", torch.float32),
                                         pytest.param("resnet18", torch.float64, marks=pytest.mark.slow),
                                         ("preresnet20", torch.float32),
                                         pytest.param("resnet110", torch.float64, marks=pytest.mark.slow),
                                         pytest.param("preresnet164", torch.float64, marks=pytest.mark.slow),
                                         # units discovered in the traced graph
                                         (f"{MODEL_FILES}/cifar_resnet_lambda.py:resnet20", torch.float32),
                                         pytest.param(VIT, torch.float32, marks=pytest.mark.skipif(
                                             not importlib.util.find_spec("timm"), reason="timm is not installed"))],
                         ids=lambda v: Path(v).name if isinstance(v, str) else str(v))
def test_shared_gradients_equal_the_masked_networks(name, dtype, device):
    torch.manual_seed(0)
    model = randomize_bn(build_model(name)).to(device, dtype)
    view = units(model)
    n = len(view.units)
    rng = random.Random(1)
    # Lengths 0..n, repeated sets and sets agreeing on the top units (rows shared there).
    sets = [frozenset(rng.sample(range(n), k)) for k in (0, 1, 2, n // 2, n - 1, n)]
    sets += [sets[3], sets[3] ^ {0}, sets[3] ^ {1}]
    few = [frozenset(), frozenset({0, n - 1})]  # units no set takes, and units every set takes
    x = torch.rand(3, 3, 32, 32, device=device, dtype=dtype)
    y = torch.randint(0, 10, (3,), device=device)
    exact_view = units(float64(model))
    for affine in (False, True):  # the study runs with BatchNorm as its affine map
        with affine_batchnorm(model) if affine else contextlib.nullcontext():
            for chosen in (sets, few):
                naive = naive_gradients(view, x, y, chosen)
                shared = shared_gradients(view, x, y, chosen)
                if dtype == torch.float32:  # judged by float64 (DESIGN.md, Numerics)
                    exact = naive_gradients(exact_view, float64(x), y, chosen)
                    assert_near_oracle(shared, naive, exact, msg=f"{name} affine={affine}")
                else:  # float64 against float64: no better oracle; a few ulps amplified by depth
                    torch.testing.assert_close(shared, naive, rtol=1e-12, atol=0.0)
    # The routes matter: the all-shortcut path and the all-residual path differ.
    shared = shared_gradients(view, x, y, sets)
    assert not torch.allclose(shared[0], shared[5]) and shared[3] == shared[6]


@pytest.mark.numerics
def test_affine_batchnorm_computes_the_same_and_restores():
    torch.manual_seed(0)
    model = randomize_bn(build_model("resnet20"))
    model.net.bn1.train()  # a BatchNorm in training mode keeps its batch statistics
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want, exact = model(x), float64(model)(float64(x))
        with affine_batchnorm(model):
            assert "forward" in vars(model.net.layer1[0].bn1) and "forward" not in vars(model.net.bn1)
            got = model(x)
    assert_near_oracle(got, want, exact)
    assert not any("forward" in vars(m) for m in model.modules())
    with pytest.raises(RuntimeError), affine_batchnorm(model):
        raise RuntimeError("restored on error too")
    assert not any("forward" in vars(m) for m in model.modules())


def test_central_interval_of_path_lengths():
    """Veit, Sec. 6: 95% of the paths of a 54-unit ResNet are 19-35 units long; the shortest
    range holding 95% is 20-34 (0.9598 of the paths), within his."""
    r = PathsResult("m", [f"u{i}" for i in range(54)], [{"length": 1, "mean": 1.0}], 0.9, 0.0, 1)
    assert (r.central["lo"], r.central["hi"]) == (20, 34) and r.central["share"] == pytest.approx(0.95978, abs=1e-5)
    assert r.to_dict()["central_95"] == r.central


def test_effective_range_and_contribution():
    assert effective_range([0.05, 0.5, 0.4, 0.05], 0.9) == (1, 2, 0.9)
    assert effective_range([0.2, 0.2, 0.2, 0.2, 0.2], 0.9)[:2] == (0, 4)
    # Gradient halving with length: the contribution peaks well below n/2.
    grad = [{"length": k, "mean": 0.5 ** k, "std": 0.0, "samples": 1} for k in range(21)]
    r = PathsResult("m", [f"u{i}" for i in range(20)], grad, 0.9, 0.0, 1)
    peak = max(r.contribution, key=lambda c: c["share"])["length"]
    assert peak < 10 and r.effective["mean_effective_length"] < r.effective["mean_path_length"]
    assert math.isclose(sum(c["share"] for c in r.contribution), 1.0)
    assert r.effective["share"] >= 0.9 and 0 < r.effective["paths_fraction"] < 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("paths")
    torch.manual_seed(0)
    for name in ("resnet8", "resnet14", "plain8"):
        save_checkpoint(randomize_bn(build_model(name)), d / f"{name}.pt")
    return d


SYN = ["--dataset", "synthetic", "--limit", "40", "--sets", "8", "--device", "cpu"]


def test_cli_paths_with_compare(checkpoints, tmp_path):
    out = tmp_path / "p"
    r = CliRunner().invoke(cli, ["paths", "--weights", str(checkpoints / "resnet14.pt"), "--compare",
                                 str(checkpoints / "resnet8.pt"), *SYN, "--samples", "6", "--images", "4",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 6 and [d["paths"] for d in res["distribution"]] == [math.comb(6, k) for k in range(7)]
    assert [g["length"] for g in res["gradient"]] == list(range(1, 7)) and all(g["samples"] == 6
                                                                                  for g in res["gradient"])
    assert all(g["q25"] <= g["median"] <= g["q75"] and g["q25"] > 0 for g in res["gradient"])
    assert set(res["effective"]) >= {"lo", "hi", "share", "paths_fraction", "mean_effective_length"}
    assert res["compare"]["n"] == 3 and "norm" in res and "loss" in res
    assert (out / "plots" / "paths.png").stat().st_size > 5000
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 7 + 4
    assert "effective paths" in r.output
    # The same seed gives the same numbers.
    CliRunner().invoke(cli, ["paths", "--weights", str(checkpoints / "resnet14.pt"), *SYN, "--samples", "6",
                             "--images", "4", "--lengths", "0,3", "--out", str(tmp_path / "a")])
    CliRunner().invoke(cli, ["paths", "--weights", str(checkpoints / "resnet14.pt"), *SYN, "--samples", "6",
                             "--images", "4", "--lengths", "0,3", "--out", str(tmp_path / "b")])
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["gradient"] for d in "ab")
    assert a == b and [g["length"] for g in a] == [0, 3]
    # A pass too large for --max-memory runs its sets in groups on the same images: the same numbers.
    r = CliRunner().invoke(cli, ["paths", "--weights", str(checkpoints / "resnet14.pt"), *SYN, "--samples", "6",
                                 "--images", "4", "--lengths", "0,3", "--max-memory", "100K", "--out",
                                 str(tmp_path / "c")])
    assert r.exit_code == 0 and "8 sets x 4 images of resnet14 need about" in r.stderr, r.output
    c = json.loads((tmp_path / "c" / "results.json").read_text())["gradient"]
    for g, h in zip(a, c):
        assert g["samples"] == h["samples"] and math.isclose(g["mean"], h["mean"], rel_tol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--weights", "{ck}/plain8.pt"], "paths: plain8 has no residual units"),
    (["--weights", "{ck}/resnet8.pt", "--lengths", "4"], "--lengths: resnet8 has 3 residual units, so a path length "
                                                         "must be in 0..3, got 4"),
    (["--weights", "{ck}/resnet8.pt", "--lengths", "-1"], "--lengths '-1': item -1 must be >= 0"),
    (["--weights", "{ck}/resnet8.pt", "--share", "1"], "--share '1': must be in (0, 1)"),
    (["--weights", "{ck}/resnet8.pt", "--sets", "0"], "--sets '0': must be in [1, 65536]"),
    (["--weights", "{ck}/resnet8.pt", "--max-memory", "lots"], "--max-memory 'lots'"),
    (["--weights", "{ck}/resnet8.pt", "--batch-size", "64"], "No such option '--batch-size'"),
])
def test_cli_bad_paths_input(args, message, checkpoints, tmp_path):
    args = [a.format(ck=checkpoints) for a in args]
    r = CliRunner().invoke(cli, ["paths", *SYN, *args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.stderr.strip().startswith(f"Error: {message}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
