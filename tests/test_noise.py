"""Noise robustness: hooks, seeding, the grid, the CLI."""
import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_near_oracle, float64
from torch import nn

from fastablate.cli import cli
from fastablate.data import build_dataset
from fastablate.engines.core.runtime import Runtime
from fastablate.engines.studies.noise import (CIFAR_C_GAUSSIAN, NoiseInjector, NoiseSpec, conv_layers, run_noise,
                                              stream_seed, summarize, t_quantile_975, trial_layers)
from fastablate.models import build_model, save_checkpoint
from fastablate.models.checkpoint import load_model
from fastablate.ops import reference


def reference_op(x, sigma, *, seed, offset, inplace):
    return x.copy_(reference.gaussian_noise(x, sigma, seed=seed, offset=offset))


def _model(name="resnet8"):
    torch.manual_seed(0)
    m = build_model(name).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture(scope="module")
def trained(trained_resnet8):
    return load_model(trained_resnet8).eval()


@pytest.fixture(scope="module")
def ds():
    return build_dataset("synthetic", None, "test", limit=60)


def _logits(model, x, injector, batch):
    out = []
    for row in range(0, x.shape[0], batch):
        injector.row = row
        with torch.no_grad():
            out.append(model(x[row:row + batch]))
    return torch.cat(out)


@pytest.mark.numerics
def test_kernel_and_reference_hooks_agree_and_noise_is_batch_size_invariant(device):
    model = _model().to(device)
    x = torch.rand(24, 3, 32, 32, device=device)
    logits, clean = {}, {}
    for name, op, net, inputs in (("kernel", None, model, x), ("reference", reference_op, model, x),
                                  ("float64", reference_op, float64(model), float64(x))):
        inj = NoiseInjector(net) if op is None else NoiseInjector(net, op)
        inj.active = {0: (0.7, stream_seed(0, 0, 0)), 4: (0.3, stream_seed(0, 0, 4))}
        logits[name, 8] = _logits(net, inputs, inj, 8)
        logits[name, 24] = _logits(net, inputs, inj, 24)
        inj.active = {}
        clean[name] = _logits(net, inputs, inj, 24)
        inj.remove()
    # The same noise wherever an image is in the batch: every float32 path near float64's.
    for path in (("kernel", 8), ("kernel", 24), ("reference", 24)):
        assert_near_oracle(logits[path], logits["reference", 8], logits["float64", 8], msg=str(path))
    assert (logits["kernel", 8] - clean["kernel"]).abs().max() > 0.01  # the noise did something
    with torch.no_grad():
        assert torch.equal(clean["kernel"], model(x))  # hooks with nothing active change nothing


def test_sigma_zero_or_p_zero_gives_clean_accuracy(ds):
    model = _model()
    sigmas = []

    def spy(x, sigma, **kw):
        sigmas.append(sigma)
        return reference_op(x, sigma, **kw)
    res = run_noise(model, ds, NoiseSpec(layers=[1, 3], p=[0.0, 1.0], sigma=[0.0, 5.0], trials=3),
                    Runtime(batch_size=25), op=spy)
    clean = res.clean["accuracy"]
    for g in res.grid:
        if g["sigma"] == 0 or g["p"] == 0:
            assert g["accuracy_mean"] == clean and g["accuracy_std"] == 0 and g["ci95"] == [clean, clean]
    # Only the points with sigma 5 and p 1 perturbed anything: 3 trials x (1 + 3 layers) x 3 batches.
    assert sigmas == [5.0] * (3 * 4 * 3)


def test_runs_reproduce_from_seed_and_differ_across_seeds(ds, trained):
    model = trained
    spec = dict(layers=[2], sigma=[1.0], trials=4, input_severities=[5])
    a = run_noise(model, ds, NoiseSpec(**spec), Runtime(batch_size=25, seed=1)).grid
    b = run_noise(model, ds, NoiseSpec(**spec), Runtime(batch_size=25, seed=1)).grid
    c = run_noise(model, ds, NoiseSpec(**spec), Runtime(batch_size=25, seed=2)).grid
    assert a == b and a != c


@pytest.mark.numerics
def test_kernel_and_reference_grids_agree(ds, trained):
    model = trained
    spec = NoiseSpec(layers=[1, 2], sigma=[0.5, 2.0], trials=2, relative=True)
    a = run_noise(model, ds, spec, Runtime(batch_size=30)).grid
    b = run_noise(model, ds, spec, Runtime(batch_size=30), op=reference_op).grid
    for ga, gb in zip(a, b):
        assert ga["accuracy_mean"] == pytest.approx(gb["accuracy_mean"], abs=1 / 60 + 1e-9)


def test_trial_layers():
    names = [n for n, _ in conv_layers(build_model("resnet20"))]
    assert len(names) == 19 and names[0] == "conv1" and names[1] == "layer1.0.conv1"
    spec = NoiseSpec(layers=[3], sigma=[1.0])
    for t in range(20):
        full = trial_layers(3, names, spec, 5, t, 1.0)
        assert len(set(full)) == 3
        half = trial_layers(3, names, spec, 5, t, 0.5)
        assert set(half) <= set(full)  # a larger p perturbs a superset
        assert trial_layers(3, names, spec, 5, t, 0.0) == []
    assert len({tuple(trial_layers(3, names, spec, 5, t, 1.0)) for t in range(20)}) > 10
    assert trial_layers("every 5", names, NoiseSpec(every=5, sigma=[1.0]), 0, 0, 1.0) == [4, 9, 14]
    at = NoiseSpec(at=["conv1", "layer3.2.conv2"], sigma=[1.0])
    assert trial_layers("conv1,layer3.2.conv2", names, at, 0, 0, 1.0) == [0, 18]


def test_summarize_and_t_quantiles():
    s = summarize([5, 6, 7], 10)
    assert s["accuracy_mean"] == pytest.approx(0.6) and s["accuracy_std"] == pytest.approx(0.1)
    assert s["ci95"] == pytest.approx([0.6 - 4.303 * 0.1 / math.sqrt(3), 0.6 + 4.303 * 0.1 / math.sqrt(3)])
    # One trial: no spread to estimate, so no interval (null), not one of zero width.
    assert summarize([4], 10)["ci95"] is None and summarize([4], 10)["accuracy_std"] is None
    assert summarize([1, 1, 1], 10)["accuracy_mean"] == 0.1
    assert t_quantile_975(30) == 2.042 and t_quantile_975(31) == pytest.approx(2.0395, abs=2e-4)
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=2e-4) and t_quantile_975(10**6) == pytest.approx(1.96, 1e-3)


def test_input_noise_severities(ds):
    res = run_noise(_model(), ds, NoiseSpec(input_severities=[1, 5], trials=2), Runtime(batch_size=25))
    assert [g["sigma"] for g in res.grid] == [CIFAR_C_GAUSSIAN[0], CIFAR_C_GAUSSIAN[4]] == [0.04, 0.10]
    assert [g["severity"] for g in res.grid] == [1, 5] and all(g["kind"] == "input" for g in res.grid)


def test_relative_sigma_scales_with_activation_std(ds):
    res = run_noise(_model(), ds, NoiseSpec(layers=[1], sigma=[0.1], relative=True, trials=1), Runtime(batch_size=30))
    assert len(res.activation_std) == len(res.layer_names) and all(s > 0 for s in res.activation_std)
    assert res.grid[0]["relative"] is True


# --- the CLI ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("noise")
    save_checkpoint(_model("resnet8"), d / "resnet8.pt")
    save_checkpoint(_model("plain8"), d / "plain8.pt")
    return d


DATA = ["--dataset", "synthetic", "--limit", "30", "--batch-size", "15", "--device", "cpu"]


def test_cli_noise_grid_with_compare(checkpoints, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["eval", "--weights", str(checkpoints / "resnet8.pt"), *DATA, "--noise-layers", "1,2",
                                 "--noise-sigma", "0.5,1", "--noise-p", "1,0.5", "--trials", "2", "--input-noise", "3",
                                 "--compare", str(checkpoints / "plain8.pt"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    act = [g for g in res["grid"] if g["kind"] == "activation"]
    assert len(act) == 2 * 2 * 2 and len(res["grid"]) == 9
    for g in act:
        assert set(g) >= {"layers", "p", "sigma", "accuracy_mean", "accuracy_std", "ci95", "trials"}
        assert g["trials"] == 2 and g["ci95"][0] <= g["accuracy_mean"] <= g["ci95"][1]
    assert res["compare"]["model"] == "plain8" and len(res["compare"]["grid"]) == 9
    table = res["table"]
    assert [row["model"] for row in table] == ["resnet8"] * 4 + ["plain8"] * 4
    assert set(table[0]) == {"model", "p", "sigma", "clean", "n=1", "n=2"}
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 18
    assert (out / "plots" / "noise-activation.png").is_file() and (out / "plots" / "noise-input.png").is_file()
    assert "n=1" in r.output


NOISE_BAD = [
    (["--noise-layers", "1"], "--noise-layers applies to the noise study (--noise-sigma, --input-noise), which is not"),
    (["--noise-sigma", "1"], "--noise-sigma needs the layers to perturb"),
    (["--noise-layers", "1", "--noise-every", "2", "--noise-sigma", "1"], "--noise-layers and --noise-every both"),
    (["--noise-layers", "9", "--noise-sigma", "1"], "--noise-layers 9: resnet8 has 7 conv layers, so n must be in 1."),
    (["--noise-at", "conv1,conv9", "--noise-sigma", "1"], "--noise-at: resnet8 has no conv layer 'conv9'"),
    (["--noise-layers", "1", "--noise-sigma", "1", "--noise-p", "1.5"], "--noise-p '1.5': item 1.5 must be in [0, 1]"),
    (["--noise-layers", "1", "--noise-sigma", "-1"], "--noise-sigma '-1': item -1 must be in [0, 1e+06]"),
    (["--noise-layers", "1", "--noise-sigma", "nan"], "--noise-sigma 'nan': item nan is not a finite number"),
    (["--input-noise", "6"], "--input-noise '6': item 6 must be in [1, 5]"),
    (["--input-noise", "0"], "--input-noise '0': item 0 must be in [1, 5]"),
    (["--input-noise", "1", "--trials", "0"], "--trials '0': must be in [1, 100000]"),
    (["--input-noise", "1", "--lesion", "all-single"], "--lesion and --noise-sigma choose separate studies"),
    (["--noise-every", "0", "--noise-sigma", "1"], "--noise-every '0': must be >= 1"),
    (["--noise-every", "8", "--noise-sigma", "1"], "--noise-every 8: resnet8 has 7 conv layers, so no layer"),
    (["--noise-p", "0.5"], "--noise-p applies to the noise study"),
    (["--trials", "3", "--lesion", "all-single"], "--trials applies to the noise study"),
]


@pytest.mark.parametrize("args, message", NOISE_BAD, ids=[m[:30] for _, m in NOISE_BAD])
def test_cli_bad_noise_input(args, message, checkpoints, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["eval", "--weights", str(checkpoints / "resnet8.pt"), *DATA, *args,
                                 "--out", str(out)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], r.stderr
    assert not out.exists()
