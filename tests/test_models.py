"""Model registry and checkpoints: ours, foreign formats, mismatches."""
import pytest
import torch

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
    with pytest.raises(FastablateError, match="unknown model 'resnet21'; choose from: resnet8"):
        build_model("resnet21")


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
