"""Model registry and checkpoints: ours, foreign formats, mismatches."""
import re

import pytest
import torch
from click.testing import CliRunner

from fastablate.cli import cli
from fastablate.errors import FastablateError
from fastablate.models import MODELS, build_model, load_model, save_checkpoint
from fastablate.models.checkpoint import read_checkpoint

SMALL = ["resnet8", "plain8", "resnet20", "plain20", "resnet18", "plain18", "resnet50", "vgg11", "vgg11_bn"]


@pytest.mark.parametrize("name", SMALL)
def test_build_and_forward(name):
    m = build_model(name, 7).eval()
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_registry_names():
    expected = {f"resnet{d}" for d in (8, 20, 32, 44, 56, 110, 18, 34, 50)}
    expected |= {f"plain{d}" for d in (20, 56, 110, 18, 34)}
    expected |= {f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")}
    assert expected <= set(MODELS)


def test_cifar_resnet_depths():
    # depth = 6n + 2 counts conv and linear layers
    for depth in (20, 56):
        m = build_model(f"resnet{depth}")
        layers = [x for x in m.modules() if isinstance(x, (torch.nn.Conv2d, torch.nn.Linear))]
        assert len(layers) == depth
    assert sum(p.numel() for p in build_model("resnet20").parameters()) == 269722  # He et al.: 0.27M


def test_imagenet_stem_for_large_inputs():
    small, large = build_model("resnet18", image_size=32), build_model("resnet18", image_size=224)
    assert small.net.conv1.kernel_size == (3, 3) and isinstance(small.net.maxpool, torch.nn.Identity)
    assert large.net.conv1.kernel_size == (7, 7)
    assert build_model("vgg11", image_size=224).net.classifier[0].in_features == 512 * 7 * 7


def test_unknown_model():
    with pytest.raises(FastablateError, match="unknown model 'resnext50'; choose from: resnet8"):
        build_model("resnext50")


def test_normalization_in_wrapper():
    m = build_model("resnet8", mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5)).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(m(x), m.net((x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 0.5))


def test_checkpoint_roundtrip(tmp_path):
    m = build_model("resnet8", 5, mean=(0.4, 0.4, 0.4), std=(0.2, 0.3, 0.4)).eval()
    save_checkpoint(m, tmp_path / "m.pt", {"epoch": 3})
    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # plain types and tensors only
    assert raw["arch"] == "resnet8" and raw["num_classes"] == 5
    loaded = load_model(tmp_path / "m.pt").eval()
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    assert loaded.meta == {"epoch": 3}
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left nothing behind


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "module_prefix"])
def test_foreign_formats(tmp_path, wrap):
    m = build_model("resnet8", 10).eval()
    state = m.net.state_dict()
    obj = {"raw": state, "state_dict": {"state_dict": state, "epoch": 1}, "model": {"model": state},
           "module_prefix": {f"module.{k}": v for k, v in state.items()}}[wrap]
    torch.save(obj, tmp_path / "f.pt")
    loaded = load_model(tmp_path / "f.pt", "resnet8", mean=(0.5,) * 3, std=(0.5,) * 3).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    assert read_checkpoint(tmp_path / "f.pt")["format"] == "foreign"


def test_foreign_needs_model_and_normalization(tmp_path):
    torch.save(build_model("resnet8").net.state_dict(), tmp_path / "f.pt")
    with pytest.raises(FastablateError, match="bare state_dict: name its model with --model"):
        load_model(tmp_path / "f.pt")
    with pytest.raises(FastablateError, match="carries no normalization: give --mean and --std"):
        load_model(tmp_path / "f.pt", "resnet8")


def test_mismatch_names_keys(tmp_path):
    save_checkpoint(build_model("resnet8"), tmp_path / "r8.pt")
    with pytest.raises(FastablateError, match="holds model resnet8, not resnet20"):
        load_model(tmp_path / "r8.pt", "resnet20")
    torch.save(build_model("resnet8").net.state_dict(), tmp_path / "f.pt")
    with pytest.raises(FastablateError, match=r"does not fit model resnet20: missing keys layer1\.1\.conv1\.weight"):
        load_model(tmp_path / "f.pt", "resnet20", mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.save(build_model("resnet8", 4).net.state_dict(), tmp_path / "c.pt")
    with pytest.raises(FastablateError, match=r"fc\.weight has shape \(4, 64\) in the file, \(10, 64\)"):
        load_model(tmp_path / "c.pt", "resnet8", num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_unreadable_checkpoint(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FastablateError, match="cannot read checkpoint"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(FastablateError, match="does not exist"):
        load_model(tmp_path / "none.pt")


@pytest.mark.parametrize("name, units, params", [("resnet26", 12, 366938), ("plain26", 12, 366938),
                                                 ("preresnet50", 24, 758362), ("preresnet110", 54, 1730522),
                                                 ("preresnet164", 54, 1703258), ("preplain20", 9, 269722)])
def test_any_cifar_depth_by_name(name, units, params):
    """He et al.: PreResNet-110 and -164 (bottleneck) have 1.7M parameters each."""
    from fastablate.units import units as unit_view
    m = build_model(name)
    assert len(unit_view(m).units) == units and sum(p.numel() for p in m.parameters()) == params


@pytest.mark.parametrize("name, message", [
    ("resnet27", "unknown model 'resnet27': a CIFAR resnet has depth 6n+2 (e.g. resnet26, resnet32)"),
    ("preresnet165", "preresnet also 9n+2 >= 164 (bottleneck units)"),
    ("plain4", "a CIFAR plain has depth 6n+2 (e.g. plain8)"),
    ("resnet", "or resnetN, plainN, preresnetN, preplainN for any N = 6n+2"),
])
def test_bad_depths(name, message):
    with pytest.raises(FastablateError, match=re.escape(message)):
        build_model(name)
    r = CliRunner().invoke(cli, ["train", "--model", name, "--dataset", "synthetic", "--limit", "10"])
    assert r.exit_code == 2 and message in r.stderr


def test_stochastic_depth_drops_in_training_scales_at_test_and_travels_with_the_checkpoint(tmp_path):
    from fastablate.units import units as unit_view
    torch.manual_seed(0)
    m = build_model("preresnet20", stochastic_depth=0.5)
    blocks = [b for s in ("layer1", "layer2", "layer3") for b in getattr(m.net, s)]
    assert [round(b.survival, 4) for b in blocks] == [1.0, 0.9375, 0.875, 0.8125, 0.75, 0.6875, 0.625, 0.5625, 0.5]
    x = torch.rand(4, 3, 32, 32)
    m.eval()
    # Test time: each residual scaled by its survival (the unit view computes the same).
    torch.testing.assert_close(unit_view(m).forward(x), m(x), rtol=0, atol=0)
    h = torch.rand(2, 64, 8, 8)
    torch.testing.assert_close(blocks[-1](h), h + 0.5 * blocks[-1].residual(h))
    # Training: the last unit is skipped in about half of the batches, the first never.
    blocks[-1].train()
    torch.manual_seed(1)
    skipped = sum(torch.equal(blocks[-1](h), h) for _ in range(200))
    assert 70 < skipped < 130
    blocks[0].train()
    assert not any(torch.equal(blocks[0](torch.rand(2, 16, 32, 32)), h) for _ in range(5))
    m.eval()
    save_checkpoint(m, tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt").eval()
    assert loaded.stochastic_depth == 0.5
    torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    with pytest.raises(FastablateError, match="model vgg11 \\(vgg\\) does not support it"):
        build_model("vgg11", stochastic_depth=0.5)
