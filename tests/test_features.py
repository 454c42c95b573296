"""Feature maps: maps and Grad-CAM against their definitions, statistics, the CLI with
--compare and --examples, layer listing, bad input."""
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import assert_near_oracle, decided, float64, oracle_bound, randomize_bn

from fastablate.cli import cli
from fastablate.engines.studies.features import LayerStats, layer_maps
from fastablate.units.layers import layer_shapes
from fastablate.models import build_model, save_checkpoint

SYN = ["--dataset", "synthetic", "--limit", "40", "--batch-size", "20", "--device", "cpu"]


def _by_definition(model, x):
    """layer2's mean map and Grad-CAM (Selvaraju et al. 2017) written out, and the logits."""
    acts = {}
    handle = model.net.layer2.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    logits = model(x)
    handle.remove()
    a = acts["a"]
    g = torch.autograd.grad(logits.gather(1, logits.argmax(1)[:, None]).sum(), a)[0]
    return a.mean(1).detach(), F.relu((g.mean((2, 3), keepdim=True) * a).sum(1)).detach(), logits.detach()


@pytest.mark.numerics
def test_mean_map_and_gradcam_follow_their_definitions():
    torch.manual_seed(0)
    model = randomize_bn(build_model("resnet8"))
    x = torch.rand(3, 3, 32, 32)
    maps, pred = layer_maps(model, ["layer2", "conv1"], x, "mean")
    cams, _ = layer_maps(model, ["layer2"], x, "gradcam")
    mean, cam, logits = _by_definition(model, x)
    exact_mean, exact_cam, exact_logits = _by_definition(float64(model), float64(x))
    assert_near_oracle(maps["layer2"], mean, exact_mean, msg="mean map")
    assert_near_oracle(cams["layer2"], cam, exact_cam, msg="Grad-CAM")
    sure = decided(exact_logits, oracle_bound(logits, exact_logits))
    assert torch.equal(pred[sure], exact_logits.argmax(1)[sure])
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_layer_stats_dead_channels_and_zeros():
    s = LayerStats()
    a = torch.zeros(4, 3, 2, 2)
    a[:, 0] = 1.0
    a[1, 1, 0, 0] = 2.0  # channel 1 is alive in one image; channel 2 never
    s.add(a[:2])
    s.add(a[2:])
    out = s.summary()
    assert out["dead_channels"] == 1 and out["channels"] == 3 and abs(out["zero_fraction"] - 31 / 48) < 1e-12
    assert abs(out["mean"] - 18 / 48) < 1e-12


def test_layer_listing_names_every_layer():
    shapes = layer_shapes(build_model("resnet20"), 32)
    assert shapes["conv1"] == (16, 32, 32) and shapes["layer3"] == (64, 8, 8) and shapes["fc"] == (10,)
    r = CliRunner().invoke(cli, ["models", "--layers", "vgg11"])
    assert r.exit_code == 0 and "features.0" in r.output and "classifier" in r.output


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, trained_resnet8):
    d = tmp_path_factory.mktemp("features")
    torch.manual_seed(0)
    save_checkpoint(randomize_bn(build_model("plain8")), d / "plain8.pt")
    r = CliRunner().invoke(cli, ["attack", "--weights", str(trained_resnet8), *SYN, "--attack", "pgd", "--eps", "0.1",
                                 "--steps", "5", "--save-examples", "--out", str(d / "attack")])
    assert r.exit_code == 0, r.output
    return d


@pytest.mark.slow
def test_cli_features_compare_and_examples(trained_resnet8, checkpoints, tmp_path):
    out = tmp_path / "f"
    r = CliRunner().invoke(cli, ["features", "--weights", str(trained_resnet8), "--compare",
                                 str(checkpoints / "plain8.pt"), *SYN, "--index", "3,17", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["layers"] == ["conv1", "layer1", "layer2", "layer3"] and res["images"] == [3, 17]
    for stats in (res["stats"]["layer2"], res["compare"]["stats"]["layer2"]):
        assert set(stats) >= {"mean", "std", "dead_fraction", "zero_fraction"} and 0 <= stats["zero_fraction"] <= 1
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"heatmaps-3.png", "heatmaps-17.png", "channels-layer1.png", "channels-layer3-plain8.png"} <= plots
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 8
    ex = tmp_path / "x"
    r = CliRunner().invoke(cli, ["features", "--weights", str(trained_resnet8), *SYN, "--images", "2", "--method",
                                 "gradcam", "--examples", str(checkpoints / "attack" / "adversarial.pt"),
                                 "--layers", "layer1.0,layer3", "--out", str(ex)])
    assert r.exit_code == 0, r.output
    res = json.loads((ex / "results.json").read_text())
    assert set(res["adversarial_change"]) == {"layer1.0", "layer3"} and res["method"] == "gradcam"
    assert all(v > 0 for v in res["adversarial_relative_change"].values())
    assert len(res["images"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--layers", "layer9"], "--layers: resnet8 has no layer 'layer9'; layers are: conv1, bn1"),
    (["--images", "2", "--index", "1"], "--images and --index both choose the images"),
    (["--index", "999"], "--index 999: synthetic/test has 40 images (0..39)"),
    (["--method", "cam"], "--method 'cam': is not one of: mean, gradcam"),
    (["--examples", "{ck}/plain8.pt"], "not attack --save-examples output"),
])
def test_cli_bad_features_input(args, message, trained_resnet8, checkpoints, tmp_path):
    args = [a.format(ck=checkpoints) for a in args]
    r = CliRunner().invoke(cli, ["features", "--weights", str(trained_resnet8), *SYN, *args,
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()
