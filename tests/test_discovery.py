"""Models from anywhere: timm:NAME, file.py:factory and package.module:factory specs, units
discovered in the traced graph, and every study on such models."""
import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import randomize_bn
from torch import nn

from fastablate.cli import cli
from fastablate.errors import FastablateError
from fastablate.models import build_model, load_model, save_checkpoint
from fastablate.units import units

MODELS = Path(__file__).parent / "models"
LAMBDA = f"{MODELS / 'cifar_resnet_lambda.py'}"
VIT = "timm:vit_tiny_patch16_224,patch_size=8,depth=2,embed_dim=48,num_heads=2"
needs_timm = pytest.mark.skipif(not __import__("importlib").util.find_spec("timm"), reason="timm is not installed")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["resnet20", "plain20", "preresnet20", "resnet18", "resnet50", "preresnet164"])
def test_discovered_units_equal_the_adapters(name):
    """Where an adapter exists, discovery finds the same residual units: names, kinds, post-
    activations, shapes, and the same lesioned outputs."""
    model = randomize_bn(build_model(name))
    known = units(model)
    residual = [u for u in known.units if u.parts.shortcut is not None]
    if not residual:  # a plain twin: no residual unit to discover
        with pytest.raises(FastablateError, match="no residual units found"):
            units(model, discovered=True)
        return
    found = units(model, discovered=True)
    assert [(u.name, u.kind, u.parts.post_kind, u.in_shape, u.out_shape) for u in found.units] == \
        [(u.name, u.kind, u.parts.post_kind, u.in_shape, u.out_shape) for u in residual]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(found.forward(x), model(x))
        for lesion in ([found.units[1].name], [found.units[-1].name, found.units[0].name]):
            torch.testing.assert_close(found.forward(x, lesion), known.forward(x, lesion))


def test_plain_model_has_no_residual_units():
    with pytest.raises(FastablateError, match="no residual units found in VGG.*modules seen: features.0"):
        units(build_model("vgg11"), discovered=True)


@pytest.mark.numerics
def test_the_copied_cifar_resnet_from_its_file():
    model = randomize_bn(build_model(f"{LAMBDA}:resnet20", 10))
    assert model.name == "cifar_resnet_lambda.py:resnet20" and model.arch == f"{Path(LAMBDA).resolve()}:resnet20"
    view = units(model)
    assert view.names() == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert [u.kind for u in view.units][3] == "projection-skip" and view.units[0].kind == "identity-skip"
    assert all(u.parts.post_kind == "relu" for u in view.units)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(view.forward(x), model(x))
        # deleting layer2.0 keeps its option-A shortcut: subsample, zero-pad, ReLU
        h = view.stem(x)
        for u in view.units[:3]:
            h = u(h)
        kept = torch.relu(nn.functional.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8)))
        torch.testing.assert_close(view["layer2.0"].lesioned(h), kept)


@needs_timm
@pytest.mark.numerics
@pytest.mark.parametrize("spec, count, first", [
    (VIT, 4, "blocks.0.attn"), ("timm:resnet10t", 4, "layer1.0"), ("timm:convnext_atto", 12, "stages.0.blocks.0")])
def test_timm_models(spec, count, first):
    model = randomize_bn(build_model(spec, 10))
    view = units(model)
    assert len(view.units) == count and view.units[0].name == first and all(u.lesionable for u in view.units)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(view.forward(x), model(x))


@needs_timm
@pytest.mark.numerics
def test_vit_units_are_attention_and_mlp_branches():
    """A ViT block gives two units; deleting the attention unit is the block without its
    attention branch, and deleting the MLP unit the block without its MLP."""
    model = build_model(VIT, 10).eval()
    view = units(model)
    assert view.names() == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    x = torch.rand(2, 3, 32, 32)

    class Zero(nn.Module):
        def forward(self, h, **options):
            return torch.zeros_like(h)
    with torch.no_grad():
        for unit, attr in (("blocks.0.attn", "attn"), ("blocks.1.mlp", "mlp")):
            block = model.net.blocks[int(unit.split(".")[1])]
            saved = getattr(block, attr)
            setattr(block, attr, Zero())
            try:
                want = model(x)
            finally:
                setattr(block, attr, saved)
            torch.testing.assert_close(view.forward(x, [unit]), want)


def test_factories_get_the_arguments_they_take(tmp_path, monkeypatch):
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "nets.py").write_text(
        "import torch.nn as nn\n"
        "def bare():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 7))\n"
        "def sized(image_size):\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size ** 2, 5))\n"
        "def anything(**kw):\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * kw['image_size'] ** 2, "
        "kw['num_classes']))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_model("userpkg.nets:bare", None, image_size=16).num_classes == 7  # counted from its output
    assert build_model("userpkg.nets:sized", None, image_size=24).num_classes == 5
    assert build_model("userpkg.nets:anything", 3, image_size=8).num_classes == 3
    with pytest.raises(FastablateError, match="gives 7 outputs, not 10: its factory does not take num_classes"):
        build_model("userpkg.nets:bare", 10, image_size=16)


@pytest.mark.parametrize("spec, message", [
    (f"{MODELS}/absent.py:f", "the file .*absent.py does not exist"),
    (f"{LAMBDA}:nothing", "has no callable 'nothing'; it defines: LambdaLayer, BasicBlock, ResNet"),
    (f"{LAMBDA}:broken", r"broken\(num_classes=10\) raised RuntimeError: out of ideas"),
    ("no_such_package.nets:f", "cannot import no_such_package.nets: ModuleNotFoundError"),
    ("timm:", "expected timm:NAME|timm has no model"),
    ("a b:c", "expected timm:NAME, path/to/file.py:FACTORY or package.module:FACTORY"),
])
def test_bad_specs(spec, message):
    with pytest.raises(FastablateError, match=message):
        build_model(spec, 10)


def test_timm_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(FastablateError, match=r"timm is not installed; pip install 'fastablate\[timm\]'"):
        build_model("timm:resnet18", 10)


def test_checkpoint_records_the_spec_and_foreign_weights_load(tmp_path):
    """Our checkpoint finds the model's file again; a moved file is one clear error; a state_dict
    saved by the user's own code (DataParallel prefix, no BatchNorm counters) loads into it."""
    src = tmp_path / "net.py"
    src.write_text(Path(LAMBDA).read_text())
    model = build_model(f"{src}:resnet8", 10)
    save_checkpoint(model, tmp_path / "ours.pt")
    again = load_model(tmp_path / "ours.pt", f"{src}:resnet8")  # the factory named again: a checkpoint runs no code
    assert again.arch == f"{src.resolve()}:resnet8"
    theirs = {f"module.{k}": v for k, v in model.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(theirs, tmp_path / "theirs.pt")
    loaded = load_model(tmp_path / "theirs.pt", f"{src}:resnet8", mean=(0.5,) * 3, std=(0.5,) * 3)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    src.rename(tmp_path / "moved.py")
    with pytest.raises(FastablateError, match="was saved from model .*net.py:resnet8: .*does not exist; if its file "
                                              "moved, give --model NEWPATH:FACTORY"):
        load_model(tmp_path / "ours.pt", f"{src}:resnet8")
    assert load_model(tmp_path / "ours.pt", f"{tmp_path / 'moved.py'}:resnet8").num_classes == 10


@pytest.fixture(scope="module")
def lambda_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lambda") / "train"
    r = run("train", "--model", f"{LAMBDA}:resnet8", "--epochs", 1, "--limit", 100, "--out", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.slow
def test_every_study_runs_on_a_discovered_model(lambda_run, tmp_path):
    weights = ["--weights", lambda_run / "model.pt", "--model", f"{LAMBDA}:resnet8"]
    r = run("eval", *weights, "--limit", 40, "--lesion", "all-single", "--lesion", "k-random",
            "--samples", 2, "--out", tmp_path / "lesion")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "lesion" / "results.json").read_text())
    assert doc["model"] == "cifar_resnet_lambda.py:resnet8"
    r = run("paths", *weights, "--limit", 20, "--out", tmp_path / "paths")
    assert r.exit_code == 0 and "3 residual units, 2^3 paths" in r.output, r.output
    r = run("eval", *weights, "--limit", 40, "--noise-layers", 1, "--noise-sigma", 0.5, "--trials", 2,
            "--out", tmp_path / "noise")
    assert r.exit_code == 0, r.output
    r = run("attack", *weights, "--limit", 10, "--queries", 20, "--out", tmp_path / "attack")
    assert r.exit_code == 0, r.output
    r = run("features", *weights, "--images", 1, "--stats-images", 8, "--out", tmp_path / "features")
    assert r.exit_code == 0, r.output


@pytest.mark.slow
@needs_timm
def test_vit_studies_on_tokens(tmp_path):
    out = tmp_path / "train"
    r = run("train", "--model", VIT, "--epochs", 1, "--limit", 60, "--out", out)
    assert r.exit_code == 0, r.output
    weights = out / "model.pt"
    r = run("eval", "--weights", weights, "--limit", 20, "--noise-layers", 2, "--noise-sigma", 0.5, "--noise-on",
            "linear", "--trials", 2, "--out", tmp_path / "noise")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "noise" / "results.json").read_text())
    assert "blocks.0.attn.qkv" in doc["conv_layers"] and "patch_embed.proj" not in doc["conv_layers"]
    r = run("features", "--weights", weights, "--method", "gradcam", "--images", 1, "--stats-images", 8,
            "--out", tmp_path / "features")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "features" / "results.json").read_text())
    assert doc["layers"] == ["patch_embed.proj", "blocks.0", "blocks.1"]  # tokens drawn on the 4x4 patch grid
    assert doc["stats"]["blocks.1"]["channels"] == 48


def test_bad_any_model_input(tmp_path):
    mlp = ["--weights", tmp_path / "mlp.pt", "--model", f"{LAMBDA}:mlp"]
    save_checkpoint(build_model(f"{LAMBDA}:mlp", 10), mlp[1])
    for args, message in [
        (["eval", *mlp, "--lesion", "all-single"], "no residual units found in Sequential"),
        (["paths", *mlp], "no residual units found in Sequential"),
        (["eval", *mlp, "--noise-layers", 1, "--noise-sigma", 1],
         "has no conv layer to perturb; --noise-on linear or all perturbs linear layers"),
        (["train", "--model", f"{LAMBDA}:broken"], "raised RuntimeError: out of ideas"),
        (["train", "--model", "no_such_package.nets:f"], "cannot import no_such_package.nets"),
        (["train", "--model", "timm:resnet18,depth"], "'depth' is not KEY=VALUE"),
    ]:
        out = tmp_path / "bad"
        r = CliRunner().invoke(cli, [str(a) for a in args] + ["--limit", "20", "--out", str(out)])
        assert r.exit_code == 2, r.output
        lines = r.output.splitlines()
        assert sum(line.startswith("Error:") for line in lines) == 1 and message in r.output, r.output
        assert not out.exists(), args


def test_models_lists_discovered_units():
    r = run("models", "--units", f"{LAMBDA}:resnet20")
    assert r.exit_code == 0 and "layer2.0  projection-skip  relu" in r.output and "9 units, 9 lesionable" in r.output
    r = run("models", "--units", "vgg11")  # the adapter's plain units
    assert r.exit_code == 0 and "features.0   plain" in r.output and "vgg11: 8 units, 1 lesionable" in r.output


@needs_timm
def test_timm_pretrained_weights_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """--init imagenet on a timm model reads timm's weights from the Hugging Face cache (here a
    stand-in file), the head excepted; a missing file is one error naming where it belongs."""
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from fastablate.models.transfer import init_imagenet

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model = build_model("timm:resnet10t", 10)
    repo = timm.models.get_pretrained_cfg("resnet10t").hf_hub_id
    with pytest.raises(FastablateError, match=f"models--{repo.replace('/', '--')}/snapshots/<revision>/"
                                              "model.safetensors is missing; nothing is downloaded"):
        init_imagenet(model)
    folder = tmp_path / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc")
    (folder / "snapshots" / "abc").mkdir(parents=True)
    stand_in = {k: v.clone() for k, v in timm.create_model("resnet10t", num_classes=1000).state_dict().items()}
    save_file(stand_in, folder / "snapshots" / "abc" / "model.safetensors")
    head = model.net.fc.weight.clone()
    init_imagenet(model)
    assert torch.equal(model.net.state_dict()["conv1.0.weight"], stand_in["conv1.0.weight"])
    assert torch.equal(model.net.fc.weight, head)  # 1,000 ImageNet classes do not fit 10


def test_a_checkpoint_never_runs_code(tmp_path, monkeypatch):
    """A checkpoint naming a file or a module as its model is refused unless the user names that
    factory: loading weights (even with weights_only) must not import a file that lies beside them."""
    payload = tmp_path / "payload.py"
    payload.write_text("import pathlib\npathlib.Path(__file__).with_name('ran').write_text('x')\n"
                       "from importlib import import_module\nmake = import_module('fastablate.models').build_model\n")
    state = build_model("resnet8").net.state_dict()
    ckpt = torch.load(_saved(tmp_path, build_model("resnet8")), weights_only=True)
    for arch in (f"{payload}:make", "this:x", "os.path:join"):
        path = tmp_path / f"{arch.replace('/', '_').replace(':', '-')}.pt"
        torch.save({**ckpt, "arch": arch, "state_dict": state}, path)
        for args in (["eval", "--weights", path, "--dataset", "synthetic", "--limit", 10],
                     ["train", "--weights", path, "--dataset", "synthetic", "--limit", 10, "--epochs", 1],
                     ["eval", "--weights", _saved(tmp_path, build_model("resnet8")), "--compare", path,
                      "--dataset", "synthetic", "--limit", 10]):
            r = CliRunner().invoke(cli, [str(a) for a in args + ["--out", tmp_path / "o"]])
            assert r.exit_code == 2 and "a checkpoint never runs code: name the factory to rebuild it, --model " \
                f"{arch}" in r.stderr, (arch, args, r.output)
        with pytest.raises(FastablateError, match="never runs code"):
            load_model(path)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "o").exists()
    assert "this" not in sys.modules  # the Zen of Python was not printed either


def _saved(folder, model):
    path = folder / "plain-resnet8.pt"
    save_checkpoint(model, path)
    return path
