"""The CLI as a user drives it, through click's CliRunner."""
import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from fastablate.cli import cli
from fastablate.models import build_model, save_checkpoint

TINY = ["--model", "resnet8", "--dataset", "synthetic", "--limit", "120", "--batch-size", "40", "--device", "cpu"]


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def test_help_does_not_import_torch():
    code = ("import sys\nfrom fastablate.cli import cli\ntry:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("NO-TORCH"), out.stdout + out.stderr


def test_version_and_listings():
    import fastablate
    assert run("--version").output.strip() == f"fastablate, version {fastablate.__version__}"
    out = run("datasets").output
    assert "digits" in out and "tinyimagenet" in out
    info = run("info").output
    assert "torch" in info and "threads" in info
    from fastablate.ops import OPS, kernel_status
    status = kernel_status()
    for op in OPS:  # every op on every device, kernel or reference
        line = next(ln for ln in info.splitlines() if ln.startswith(op + " "))
        assert f"cpu: {'kernel' if status[op]['cpu'] else 'reference'}" in line and "cuda: " in line


def test_models_listing(monkeypatch):
    # Counted from the architecture on the meta device: no weights are allocated or initialized.
    import torch.nn.init
    real = torch.nn.init.kaiming_normal_
    monkeypatch.setattr(torch.nn.init, "kaiming_normal_",
                        lambda t, *a, **k: real(t, *a, **k) if t.is_meta else pytest.fail("weights in memory"))
    r = run("models")
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("resnet20 "))
    assert "0.27M" in line and " 9 " in line
    vgg = next(ln for ln in r.output.splitlines() if ln.startswith("vgg19 "))
    assert "20.03M" in vgg and " 16 " in vgg and "resnet50 " in r.output
    assert "and by name: resnetN, plainN, preresnetN, preplainN for any N = 6n+2" in r.output
    assert "preresnet164" in r.output and "cifar-preresnet" in r.output


def test_each_command_s_own_defaults(tmp_path):
    # paths measures on training images (Veit), so its --split defaults to train; --split test,
    # though it is the other commands' default, still chooses test.
    assert "Split to use. [default: train]" in " ".join(run("paths", "--help").output.split())
    assert "Split to use. [default: test]" in " ".join(run("eval", "--help").output.split())
    ckpt = tmp_path / "r8.pt"
    save_checkpoint(build_model("resnet8"), ckpt)
    for args, split in (([], "train"), (["--split", "test"], "test")):
        out = tmp_path / split
        r = run("paths", "--weights", ckpt, "--dataset", "synthetic", "--limit", "20", "--samples", "1", *args,
                "--out", out)
        assert r.exit_code == 0, r.output
        assert json.loads((out / "run.json").read_text())["config"]["split"] == split


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    r = run("train", *TINY, "--epochs", "2", "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_train_writes_a_complete_run(trained):
    info = json.loads((trained / "run.json").read_text())
    assert info["status"] == "complete" and info["config"]["epochs"] == 2 and info["versions"]["torch"]
    res = json.loads((trained / "results.json").read_text())
    assert 0 <= res["accuracy"] <= 1 and res["epochs"] == 2 and len(res["history"]) == 2
    for f in ("results.csv", "metrics.csv", "model.pt", "last.pt", "plots/curves.png", "plots/augmentations.png"):
        assert (trained / f).is_file(), f
    assert len((trained / "metrics.csv").read_text().splitlines()) == 3


def test_eval_reproduces_training_accuracy(trained, tmp_path):
    r = run("eval", "--weights", trained / "model.pt", "--dataset", "synthetic", "--limit", "120",
            "--batch-size", "40", "--out", tmp_path / "e")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert res["accuracy"] == json.loads((trained / "results.json").read_text())["accuracy"]
    assert sum(map(sum, res["confusion"])) == 120 and len(res["per_class"]) == 10
    assert (tmp_path / "e" / "plots" / "confusion.png").is_file()
    assert f"accuracy {res['accuracy']:.4f}" in r.output


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted(trained, tmp_path, monkeypatch):
    import fastablate.engines.studies.train_loop as train_mod

    real, calls = train_mod.evaluate, []

    def interrupt_second_epoch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train_mod, "evaluate", interrupt_second_epoch)
    out = tmp_path / "r"
    r = CliRunner().invoke(cli, ["train", *TINY, "--epochs", "2", "--out", str(out)])
    assert r.exit_code != 0
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert not (out / "results.json").exists() and (out / "model.pt").exists()
    monkeypatch.setattr(train_mod, "evaluate", real)
    r = run("train", *TINY, "--epochs", "2", "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    assert "epoch 1/2" not in r.output and "epoch 2/2" in r.output
    a = torch.load(trained / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_needs_out():
    r = CliRunner().invoke(cli, ["train", "--resume"])
    assert r.exit_code == 2 and r.stderr.strip() == "Error: --resume needs --out DIR of the run to continue"


def test_config_file_env_and_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 3\nbatch-size: 30\nlr: 0.05\n")
    common = ["train", "--model", "resnet8", "--dataset", "synthetic", "--limit", "60", "--config", cfg]
    r = run(*common, "--epochs", "1", "--out", tmp_path / "a", env={"FASTABLATE_TRAIN_LR": "0.02"})
    assert r.exit_code == 0, r.output
    conf = json.loads((tmp_path / "a" / "run.json").read_text())["config"]
    assert (conf["epochs"], conf["batch_size"], conf["lr"]) == (1, 30, 0.02)  # flag > env > file
    cfg.write_text("epochs: 1\nbogus: 2\n")
    r = run(*common, "--out", tmp_path / "b")
    assert r.exit_code == 2 and "unknown option(s) bogus" in r.output


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    save_checkpoint(build_model("resnet8", 10), d / "r8.pt")
    torch.save(build_model("resnet8", 10).net.state_dict(), d / "foreign.pt")
    return d


BAD = [
    (["train", "--model", "resnext50"], "unknown model 'resnext50'; choose from: resnet8"),
    (["train", "--dataset", "mnist"], "unknown dataset 'mnist'; choose from: digits"),
    (["eval", "--weights", "{ck}/r8.pt", "--dataset", "imagefolder", "--data-dir", "{tmp}/absent"],
     "dataset imagefolder: no test split at"),
    (["eval", "--weights", "{ck}/r8.pt", "--model", "resnet20"], "holds model resnet8, not resnet20"),
    (["eval", "--weights", "{ck}/foreign.pt", "--model", "resnet20", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2"],
     "does not fit model resnet20: missing keys layer1.1.conv1.weight"),
    (["eval", "--weights", "{ck}/r8.pt", "--device", "tpu"], "--device 'tpu': is not one of: auto, cpu, cuda"),
    (["train", "--batch-size", "0"], "--batch-size '0': must be in [1, 1048576]"),
    (["train", "--batch-size", "-3"], "--batch-size '-3': must be in [1, 1048576]"),
    (["train", "--mean", "0.5,x,0.5", "--std", "1,1,1"], "--mean '0.5,x,0.5': item 'x' is not a number"),
    (["train", "--mean", "0.5,0.5", "--std", "1,1"], "--mean/--std have 2 values, the images have 3 channels"),
    (["train", "--mean", "0.5,0.5,0.5"], "--mean and --std go together"),
    (["eval", "--weights", "{tmp}/none.pt"], "checkpoint '{tmp}/none.pt' does not exist"),
    (["eval"], "eval needs --weights CHECKPOINT"),
    (["train", "--limit", "0"], "--limit '0': must be >= 1"),
    (["train", "--resume"], "--resume: no last.pt in"),
    (["train", "--epochs", "0"], "--epochs '0': must be in [1, 100000]"),
] + ([] if torch.cuda.is_available() else [(["train", "--device", "cuda"], "--device cuda, but no CUDA device")])


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a[:3]) + "|" + m[:20] for a, m in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(args, message, ckpt, tmp_path):
    out = tmp_path / "out"
    fill = {"ck": str(ckpt), "tmp": str(tmp_path)}
    r = CliRunner().invoke(cli, [a.format(**fill) for a in args] + ["--out", str(out)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert message.format(**fill) in lines[0]
    assert not out.exists()
    assert "Traceback" not in r.output


TRAIN_CONFIGS = [p for p in sorted(__import__("pathlib").Path(__file__).parent.parent.glob("configs/*.yaml"))
                 if "fastablate train --config" in p.read_text()]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path, tmp_path):
    # Every key must be a train option; flags override the file's model/data/epochs to keep this fast.
    r = run("train", "--config", path, "--model", "resnet8", "--dataset", "synthetic", "--limit", "20",
            "--epochs", "1", "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    conf = json.loads((tmp_path / "c" / "run.json").read_text())["config"]
    import yaml
    for key, value in yaml.safe_load(path.read_text()).items():
        if key.replace("-", "_") not in ("model", "dataset", "epochs"):
            assert conf[key.replace("-", "_")] == value
