"""--compare across architectures: every study on a ResNet beside a VGG, a plain net, a deeper
ResNet and a foreign bare state_dict named as MODEL=FILE, over the same images."""
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import randomize_bn

from fastablate.cli import cli
from fastablate.models import build_model, save_checkpoint

DATA = ["--dataset", "synthetic", "--limit", "20", "--batch-size", "10", "--device", "cpu"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    for name in ("resnet8", "vgg11", "plain8", "resnet14"):
        save_checkpoint(randomize_bn(build_model(name)), d / f"{name}.pt")
    # A foreign file: the bare state_dict of another repository's resnet14, no metadata.
    torch.save(randomize_bn(build_model("resnet14")).net.state_dict(), d / "peer14.th")
    return d


def run(*args, code=0):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == code, (r.output, r.exception)
    return r


def compare_args(d):
    return ["--weights", d / "resnet8.pt", "--compare", d / "vgg11.pt", "--compare", d / "plain8.pt",
            "--compare", f"resnet14={d / 'peer14.th'}"]


STUDIES = {
    "eval": ["eval"],
    "lesion": ["eval", "--lesion", "all-single", "--lesion", "k-random", "--samples", "2"],
    "noise": ["eval", "--noise-layers", "1,2", "--noise-sigma", "0.5", "--trials", "2"],
    "attack": ["attack", "--attack", "pgd", "--eps", "0.03", "--steps", "2"],
    "features": ["features", "--images", "2"],
}


@pytest.mark.parametrize("study", [s if s == "lesion" else pytest.param(s, marks=pytest.mark.slow) for s in STUDIES])
def test_every_study_compares_across_architectures(study, ckpts, tmp_path):
    out = tmp_path / study
    run(*STUDIES[study], *compare_args(ckpts), *DATA, "--out", out)
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["compare"]) == 3 and json.loads((out / "run.json").read_text())["status"] == "complete"
    if study == "eval":  # its layout names no model; its plots do
        assert {p.name for p in (out / "plots").iterdir()} == {
            "confusion.png", "confusion-vgg11.png", "confusion-plain8.png", "confusion-resnet14.png"}
    else:
        assert doc["model"] == "resnet8" and [c["model"] for c in doc["compare"]] == ["vgg11", "plain8", "resnet14"]


@pytest.mark.slow
def test_features_draws_each_model_with_its_own_layers(ckpts, tmp_path):
    out = tmp_path / "f"
    run("features", "--images", "1", "--weights", ckpts / "resnet8.pt", "--compare", ckpts / "vgg11.pt", *DATA,
        "--out", out)
    doc = json.loads((out / "results.json").read_text())
    assert doc["layers"][0] == "conv1" and all(n.startswith("features.") for n in doc["compare"]["layers"])
    assert len(list((out / "plots").glob("heatmaps-*.png"))) == 1
    assert (out / "plots" / "channels-features.0-vgg11.png").is_file()


@pytest.mark.slow
def test_features_pairs_layers_by_explicit_lists(ckpts, tmp_path):
    out = tmp_path / "f"
    run("features", "--images", "1", "--weights", ckpts / "resnet8.pt", "--compare", ckpts / "vgg11.pt", *DATA,
        "--layers", "conv1,layer1,layer3", "--compare-layers", "features.0,features.4,features.18", "--out", out)
    doc = json.loads((out / "results.json").read_text())
    assert doc["layers"] == ["conv1", "layer1", "layer3"]
    assert doc["compare"]["layers"] == ["features.0", "features.4", "features.18"]


@pytest.mark.slow
def test_features_noise_view_resnet_beside_vgg(ckpts, tmp_path):
    """The noise experiment's activation views: clean vs noisy at the same layers, with the
    per-layer change, and no change above the first perturbed layer."""
    out = tmp_path / "n"
    run("features", "--images", "1", "--weights", ckpts / "resnet8.pt", "--compare", ckpts / "vgg11.pt", *DATA,
        "--noise-at", "layer2.0.conv1", "--noise-sigma", "0.5", "--out", out, code=2)  # not a conv of vgg11
    run("features", "--images", "1", "--weights", ckpts / "resnet8.pt", "--compare", ckpts / "vgg11.pt", *DATA,
        "--noise-layers", "2", "--noise-sigma", "1", "--noise-relative", "--out", out)
    doc = json.loads((out / "results.json").read_text())
    for d in (doc, doc["compare"]):
        assert len(d["noise"]["layers"]) == 2 and d["noise"]["relative"] is True
        assert set(d["noise_relative_change"]) == set(d["layers"]) and "adversarial_change" not in d
    assert doc["noise_relative_change"]["conv1"] == 0.0  # before any perturbed layer
    assert doc["noise_relative_change"][doc["layers"][-1]] > 0
    assert "noise_change" in (out / "results.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("args, message", [
    (["--noise-sigma", "1"], "--noise-sigma needs the layers to perturb: --noise-layers N or --noise-at NAME,.."),
    (["--noise-layers", "2"], "--noise-layers applies to the noise view (--noise-sigma), which is not given"),
    (["--noise-sigma", "1", "--noise-layers", "99"], "--noise-layers 99: resnet8 has 7 conv layers"),
    (["--layers", "conv1,layer1", "--compare-layers", "features.0"],
     "--compare-layers features.0 names 1 layers of vgg11, --layers 2 of resnet8: pair them one to one"),
    (["--layers", "conv1", "--compare-layers", "features.0", "--compare-layers", "features.0"],
     "--compare-layers is given 2 times for 1 --compare models"),
    (["--layers", "conv1", "--compare-layers", "features.99"], "--compare-layers: vgg11 has no layer 'features.99'"),
])
def test_bad_compare_layers_and_noise_view(args, message, ckpts, tmp_path):
    r = run("features", "--weights", ckpts / "resnet8.pt", "--compare", ckpts / "vgg11.pt", *DATA, *args,
            "--out", tmp_path / "o", code=2)
    assert message in r.stderr and not (tmp_path / "o").exists()


def test_paths_leaves_out_compared_plain_nets_with_a_note(ckpts, tmp_path):
    out = tmp_path / "p"
    data = [a for a in DATA if a not in ("--batch-size", "10")]  # paths stacks --sets, not batches
    r = run("paths", "--samples", "2", "--images", "2", *compare_args(ckpts), *data, "--out", out)
    assert "note: --compare vgg11 left out: vgg11 has no residual units" in r.stderr
    assert "note: --compare plain8 left out: plain8 has no residual units" in r.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["model"] == "resnet8" and doc["compare"]["model"] == "resnet14"
    # A plain --weights model is an error, not a skip: there is nothing to compare against.
    r = run("paths", "--weights", ckpts / "vgg11.pt", *data, "--out", tmp_path / "q", code=2)
    assert r.stderr.strip() == "Error: paths: vgg11 has no residual units (a plain net has one path only)"
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_study_with_given_models_across_architectures(ckpts, tmp_path):
    out = tmp_path / "s"
    run("study", "--weights", ckpts / "resnet8.pt", "--compare", ckpts / "vgg11.pt", "--compare",
        f"resnet14={ckpts / 'peer14.th'}", "--dataset", "synthetic", "--limit", "40", "--device", "cpu",
        "--only", "lesion,paths,features", "--samples", "2", "--images", "1", "--out", out)
    paths = json.loads((out / "paths" / "results.json").read_text())
    assert paths["model"] == "resnet8" and paths["compare"]["model"] == "resnet14"  # the VGG has no paths
    lesion = json.loads((out / "lesion" / "results.json").read_text())
    assert [c["model"] for c in lesion["compare"]] == ["vgg11", "resnet14"]
    md = (out / "report.md").read_text()
    assert "| " + str(ckpts / "peer14.th") + " | resnet14 |" in md


def test_bare_state_dict_needs_its_model_named(ckpts, tmp_path):
    r = run("eval", "--weights", ckpts / "resnet8.pt", "--compare", ckpts / "peer14.th", *DATA,
            "--out", tmp_path / "o", code=2)
    assert r.stderr.splitlines()[-1] == (f"Error: --compare {ckpts / 'peer14.th'} is a bare state_dict: name its "
                                         f"model as MODEL=FILE, e.g. --compare resnet8={ckpts / 'peer14.th'}")
    r = run("eval", "--weights", ckpts / "resnet8.pt", "--compare", f"vgg11={ckpts / 'peer14.th'}", *DATA,
            "--out", tmp_path / "o", code=2)
    assert "does not fit model vgg11" in r.stderr and not (tmp_path / "o").exists()
    r = run("eval", "--weights", ckpts / "resnet8.pt", "--compare", f"resnet14={ckpts / 'missing.th'}", *DATA,
            "--out", tmp_path / "o", code=2)
    assert "missing.th" in r.stderr and not (tmp_path / "o").exists()
