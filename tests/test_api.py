"""The library functions: a model object and data in, a result out, nothing written unless
asked; the same numbers and run directory as the CLI; the caller's model left as it came."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import fastablate as fa
from fastablate.cli import cli
from fastablate.data import build_dataset
from fastablate.models import build_model, load_model

DATA = ["--dataset", "synthetic", "--limit", "40", "--batch-size", "20", "--device", "cpu"]
EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "lesion_own_resnet.py"


def _timeless(doc):
    """A results document without its timings (the only numbers two runs may not share)."""
    if isinstance(doc, dict):
        return {k: _timeless(v) for k, v in doc.items() if k not in ("seconds", "seconds_per_image", "checkpoint")}
    if isinstance(doc, list):
        return [_timeless(v) for v in doc]
    return doc


CASES = {
    "evaluate": (["eval"], {}),
    "lesion": (["eval", "--lesion", "all-single", "--lesion", "k-random", "--k", "1,2", "--samples", "3"],
               {"plans": ["all-single", "k-random"], "k": [1, 2], "samples": 3}),
    "noise": (["eval", "--noise-layers", "1,2", "--noise-sigma", "0.5,1", "--trials", "2"],
              {"layers": [1, 2], "sigma": [0.5, 1.0], "trials": 2}),
    "attack": (["attack", "--attack", "sparse", "--k", "2", "--steps", "3", "--queries", "5"],
               {"attack": "sparse", "k": 2, "steps": 3, "queries": 5}),
    "features": (["features", "--images", "2"], {"images": 2}),
}


@pytest.mark.parametrize("study", [s if s in ("evaluate", "lesion") else pytest.param(s, marks=pytest.mark.slow)
                                   for s in CASES])
def test_the_api_and_the_cli_give_the_same_results(study, trained_resnet8, tmp_path):
    args, kw = CASES[study]
    r = CliRunner().invoke(cli, [*args, "--weights", str(trained_resnet8), *DATA, "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    res = getattr(fa, study)(load_model(trained_resnet8), "synthetic", limit=40, batch_size=20, **kw)
    cli_doc = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert _timeless(json.loads(json.dumps(res.to_dict()))) == _timeless(cli_doc)
    # save() writes the CLI's run directory: the same files, results.json the same numbers.
    res.save(tmp_path / "api")
    files = {p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*")}
    assert {p.relative_to(tmp_path / "api") for p in (tmp_path / "api").rglob("*")} == files
    assert _timeless(json.loads((tmp_path / "api" / "results.json").read_text())) == _timeless(cli_doc)
    info = json.loads((tmp_path / "api" / "run.json").read_text())
    assert info["status"] == "complete" and info["command"] == args[0]


def test_paths_api_equals_cli(trained_resnet8, tmp_path):
    r = CliRunner().invoke(cli, ["paths", "--weights", str(trained_resnet8), "--dataset", "synthetic", "--split",
                                 "test", "--limit", "40", "--samples", "3", "--images", "4", "--out",
                                 str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    res = fa.paths(load_model(trained_resnet8), "synthetic", split="test", limit=40, samples=3, images=4)
    assert _timeless(json.loads(json.dumps(res.to_dict()))) == \
        _timeless(json.loads((tmp_path / "cli" / "results.json").read_text()))


def test_nothing_is_written_and_the_model_comes_back_as_it_was(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    net = build_model("resnet8").net  # a bare nn.Module: its inputs unnormalized
    net.train()
    net.layer1[0].bn1.eval()  # a mixed state, as a fine-tuning loop leaves it
    net.fc.weight.requires_grad_(False)
    modes = [m.training for m in net.modules()]
    x, y = torch.rand(24, 3, 32, 32), torch.randint(0, 10, (24,))
    before = [p.detach().clone() for p in net.parameters()]
    for fn, kw in ((fa.evaluate, {}), (fa.lesion, {"plans": ["all-single"]}), (fa.noise, {"layers": [1],
                   "sigma": [0.5], "trials": 2}), (fa.attack, {"attack": "pgd", "steps": 2}),
                   (fa.paths, {"samples": 2}), (fa.features, {"layers": "all"})):
        res = fn(net, (x, y), **kw)
        assert res.to_dict() and res.rows() is not None
        assert [m.training for m in net.modules()] == modes, fn.__name__
        assert all(p.grad is None for p in net.parameters()), fn.__name__
        assert not net.fc.weight.requires_grad and net.conv1.weight.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert next(net.parameters()).device.type == "cpu"


def test_every_kind_of_data_gives_the_same_result():
    model = load_model_fixture()
    ds = build_dataset("synthetic", None, "test", limit=30)
    x, y = ds.floats(torch.arange(30)), ds.labels
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    results = [fa.evaluate(model, d).to_dict() for d in ((x, y), loader, loader.dataset, ds, "synthetic")]
    results[-1] = fa.evaluate(model, "synthetic", limit=30).to_dict()
    assert all(r["confusion"] == results[0]["confusion"] for r in results)
    uint8 = fa.evaluate(model, ((x * 255).round().to(torch.uint8), y)).to_dict()
    assert uint8["confusion"] == results[0]["confusion"]


def load_model_fixture():
    torch.manual_seed(0)
    return build_model("resnet8").eval()


def test_compare_runs_the_same_study_on_other_models():
    torch.manual_seed(0)
    a, b = build_model("resnet8").net.eval(), build_model("plain8").net.eval()
    x, y = torch.rand(20, 3, 32, 32), torch.randint(0, 10, (20,))
    res = fa.lesion(a, (x, y), compare=[b], plans=["all-single"])
    doc = res.to_dict()
    assert doc["model"] == "CifarResNet" and doc["compare"]["model"] == "CifarResNet (2)"
    assert len(res.results) == 2 and res.intact == res.results[0].intact
    figs = res.plot()
    assert figs and all(hasattr(f, "savefig") for f in figs)


@pytest.mark.parametrize("call, message", [
    (lambda m, d: fa.lesion(m, d, plans=["bogus"]), "--lesion bogus: is not a plan"),
    (lambda m, d: fa.lesion(m, d), "lesion needs plans= (--lesion)"),
    (lambda m, d: fa.lesion(m, d, plans=["all-single"], samples=0), "--samples 0: must be in [1, 100000]"),
    (lambda m, d: fa.lesion(m, d, plan=["all-single"]), "lesion: unknown option 'plan'; options: "),
    (lambda m, d: fa.noise(m, d, trials=3), "noise needs one of sigma= (--noise-sigma), input_severities="),
    (lambda m, d: fa.evaluate(m, (d[0] * 4 - 2, d[1])), "images range over [-2"),
    (lambda m, d: fa.evaluate(m, (d[0], d[1][:3])), "labels of shape (3,)"),
    (lambda m, d: fa.evaluate(m, "imagefolder"), "dataset imagefolder needs --data-dir"),
    (lambda m, d: fa.evaluate(m, [1, 2, 3]), "expected an (x, y) pair of tensors"),
    (lambda m, d: fa.evaluate("resnet8", d), "expected a torch.nn.Module"),
    (lambda m, d: fa.evaluate(build_model("resnet8"), d, mean=(0.5,) * 3, std=(0.2,) * 3),
     "normalizes its inputs itself"),
])
def test_bad_options_and_data_raise_the_cli_s_messages(call, message):
    model = build_model("resnet8").net.eval()
    data = (torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    with pytest.raises(fa.FastablateError) as e:
        call(model, data)
    assert message in str(e.value) and isinstance(e.value, ValueError)


@pytest.mark.slow
def test_import_is_light():
    code = "import sys, fastablate; print('torch' in sys.modules, callable(fastablate.lesion), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True", "True"], out.stderr


@pytest.mark.slow
def test_the_example_runs_and_writes_nothing(tmp_path):
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "one block deleted: mean accuracy" in out.stdout and "effective paths:" in out.stdout
    acc = float(out.stdout.split("clean accuracy ")[1].split()[0])
    assert acc > 0.5  # the example's model learned: its studies are of a real classifier
    assert list(tmp_path.iterdir()) == []


def test_train_api_equals_the_cli_and_trains_the_model_in_place(tmp_path):
    from fastablate.engines.core.setup import seed_everything
    args = ["--dataset", "synthetic", "--limit", "60", "--epochs", "2", "--batch-size", "20", "--device", "cpu"]
    r = CliRunner().invoke(cli, ["train", "--model", "resnet8", *args, "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    seed_everything(0)  # as the CLI builds its model
    ds = build_dataset("synthetic", None, "train")
    model = build_model("resnet8", mean=ds.mean, std=ds.std)
    before = model.net.fc.weight.detach().clone()
    res = fa.train(model, "synthetic", "synthetic", limit=60, epochs=2, batch_size=20)
    cli_doc = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert _timeless(json.loads(json.dumps(res.to_dict()))) == _timeless(cli_doc)
    assert not torch.equal(before, model.net.fc.weight) and model.training  # trained in place, mode kept
    assert fa.evaluate(model, "synthetic", limit=60).to_dict()["accuracy"] == cli_doc["accuracy"]
    res.save(tmp_path / "api")
    assert {p.name for p in (tmp_path / "api").iterdir()} == {p.name for p in (tmp_path / "cli").iterdir()} - {
        "last.pt"}  # no resume state: a library training is not resumed
    assert load_model(tmp_path / "api" / "model.pt").meta["epoch"] == 2
    with pytest.raises(fa.FastablateError, match="head= applies to fastablate train's registry models"):
        fa.train(model, "synthetic", "synthetic", head="mlp:32")


def test_train_api_takes_the_new_recipe_options_as_the_cli_does(tmp_path):
    from fastablate.engines.core.setup import seed_everything
    args = ["--dataset", "synthetic", "--limit", "60", "--epochs", "2", "--batch-size", "20", "--device", "cpu",
            "--image-size", "24", "--optimizer", "adamw", "--val-fraction", "0.2", "--keep", "best",
            "--lr-scaling", "none", "--augment", "crop,color-jitter:0.2,0.2,0.2,0.05,blur:1@0.5"]
    r = CliRunner().invoke(cli, ["train", "--model", "resnet8", *args, "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    seed_everything(0)
    ds = build_dataset("synthetic", None, "train")
    model = build_model("resnet8", mean=ds.mean, std=ds.std, image_size=24)
    res = fa.train(model, "synthetic", "synthetic", limit=60, epochs=2, batch_size=20, image_size=24,
                   optimizer="adamw", val_fraction=0.2, keep="best", lr_scaling="none",
                   augment="crop,color-jitter:0.2,0.2,0.2,0.05,blur:1@0.5")
    cli_doc = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert _timeless(json.loads(json.dumps(res.to_dict()))) == _timeless(cli_doc)
    assert res.to_dict()["kept"]["by"] == "val_accuracy" and res.to_dict()["eval_sets"]["val"]["n"] == 10
    with pytest.raises(fa.FastablateError, match="stem= applies to fastablate train's registry models"):
        fa.train(model, "synthetic", "synthetic", stem="imagenet")
