"""The library refuses what the CLI refuses, with the CLI's checks, before anything is computed
or changed; a checkpoint's saved sets, a user's factory and signals are handled as the CLI
handles them; plotting leaves a notebook's matplotlib alone."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import fastablate as fa
from fastablate.cli import cli
from fastablate.models import build_model

X, Y = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 4


class Outputs(nn.Module):
    """A model that returns something other than (batch, classes) logits."""

    def __init__(self, kind: str):
        super().__init__()
        self.linear, self.kind = nn.Linear(3 * 32 * 32, 10), kind

    def forward(self, x):
        z = self.linear(x.flatten(1))
        return {"tuple": (z, z), "dict": {"logits": z}, "3d": z[:, None]}[self.kind]


class Items(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return X[i], self.labels[i]


def _net():
    torch.manual_seed(0)
    return build_model("resnet8").net.eval()


CASES = [
    (lambda: fa.evaluate(_net(), (X, Y), mean=(0.5,) * 3, std=(-0.5,) * 3), "--std -0.5,-0.5,-0.5: item -0.5 must"),
    (lambda: fa.evaluate(_net(), (X, Y), mean=(0.5,) * 2, std=(0.5,) * 2), "--mean/--std have 2 values, the images "
                                                                           "have 3 channels"),
    (lambda: fa.evaluate(_net(), (X, Y), mean="grey", std=(0.5,) * 3), "give one number per channel each"),
    (lambda: fa.evaluate(_net(), Items([0.99] * 8)), "Dataset item 0: its label 0.99 is not an integer class index"),
    (lambda: fa.evaluate(_net(), Items([True] * 8)), "Dataset item 0: its label True is not an integer class index"),
    (lambda: fa.evaluate(_net(), Items([torch.tensor(1.0)] * 8)), "its label 1.0 is not an integer class index"),
    (lambda: fa.evaluate(_net(), (X, Y.bool())), "labels of shape (8,) and dtype torch.bool"),
    (lambda: fa.evaluate(Outputs("tuple"), (X, Y)), "model Outputs returns a tuple; the studies need logits"),
    (lambda: fa.evaluate(Outputs("dict"), (X, Y)), "model Outputs returns a dict; the studies need logits"),
    (lambda: fa.evaluate(Outputs("3d"), (X, Y)), "returns a Tensor of shape (1, 1, 10); the studies need logits"),
    (lambda: fa.evaluate(nn.Linear(10, 10), (X, Y)), "model Linear cannot take 32x32 images of 3 channels: "
                                                     "RuntimeError: mat1 and mat2"),
    (lambda: fa.evaluate(_net(), (X, Y + 4), compare=[build_model("resnet8", 5).net.eval()]),
     "has 8 classes, CifarResNet (2) has 5 outputs"),
    (lambda: fa.evaluate(build_model("resnet8").net.to("meta"), (X, Y)), "has its parameters on the meta device"),
    (lambda: fa.evaluate(nn.Flatten(), (X, Y)), "model Flatten has no parameters: nothing to study"),
    (lambda: fa.evaluate(_net(), (X[:0], Y[:0])), "the data holds no images"),
    (lambda: fa.evaluate(_net(), (X, Y), limit=0), "--limit 0: must be >= 1"),
    (lambda: fa.evaluate(_net(), (X, Y), batch_size=0), "--batch-size 0: must be in [1, 1048576]"),
    (lambda: fa.evaluate(_net(), (X, Y), batch_size=2.5), "--batch-size 2.5: is not a whole number"),
    (lambda: fa.lesion(_net(), (X, Y), plans=["all-single"], image_size=0), "--image-size 0: must be in [8, 1024]"),
    (lambda: fa.evaluate(_net(), (X, Y), workers=-1), "--workers -1: must be"),
]


@pytest.mark.parametrize("call, message", CASES, ids=range(len(CASES)))
def test_the_library_refuses_what_the_cli_refuses(call, message):
    with pytest.raises(fa.FastablateError) as e:
        call()
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("what", ["test labels beyond the model's classes", "every parameter frozen"])
def test_train_checks_everything_before_the_first_step(what):
    model = build_model("resnet8", 5)
    if what == "every parameter frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        test, message = (X, Y), r"every parameter of resnet8 is frozen \(requires_grad False\): nothing to train"
    else:
        test, message = (X, Y + 4), "has 8 classes, resnet8 has 5 outputs"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fa.FastablateError, match=message):
        fa.train(model, (X, Y), test, epochs=1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BatchNorm statistics too
    if what != "every parameter frozen":
        return
    r = CliRunner().invoke(cli, ["train", "--model", "resnet8", "--dataset", "synthetic", "--limit", "20",
                                 "--freeze", "stem,layer1,layer2,layer3,head", "--out", "never"])
    assert r.exit_code == 2 and "freezes every parameter: nothing would train" in r.stderr
    assert not os.path.exists("never")


def test_plots_leave_the_users_backend_and_figures_alone(tmp_path):
    code = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
import torch, fastablate as fa
from fastablate.models import build_model
fig = plt.figure()
res = fa.lesion(build_model("resnet8").net.eval(), (torch.rand(8, 3, 32, 32), torch.arange(8) % 4),
                plans=["all-single"])
figs = res.plot()
res.save({str(tmp_path / "run")!r})
print(matplotlib.get_backend(), plt.get_fignums(), len(figs), all(f.number is None if hasattr(f, "number") else True
                                                                 for f in figs))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    backend, *rest = out.stdout.split()
    assert backend == "svg" and out.stdout.split("[")[1].startswith("1]")  # the user's one figure, still open
    assert (tmp_path / "run" / "plots" / "lesion-single.png").is_file()


def test_a_factory_that_exits_or_imports_its_neighbour(tmp_path):
    (tmp_path / "blocks.py").write_text("import torch\nWIDTH = 16\n")
    (tmp_path / "nets.py").write_text(
        "import argparse, torch\nfrom blocks import WIDTH\n"
        "def make(num_classes=10):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, WIDTH, 3), torch.nn.AdaptiveAvgPool2d(1),"
        " torch.nn.Flatten(), torch.nn.Linear(WIDTH, num_classes))\n"
        "def script():\n    argparse.ArgumentParser().parse_args(['--help'])\n")
    (tmp_path / "cli_script.py").write_text("import sys\nsys.exit(0)\n")
    before = list(sys.path)
    r = CliRunner().invoke(cli, ["train", "--model", f"{tmp_path / 'nets.py'}:make", "--dataset", "synthetic",
                                 "--limit", "20", "--epochs", "1", "--out", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output  # `from blocks import WIDTH` found beside nets.py
    assert sys.path == before and "blocks" in sys.modules
    del sys.modules["blocks"]
    for spec, message in ((f"{tmp_path / 'nets.py'}:script", "script() raised SystemExit: 0"),
                          (f"{tmp_path / 'cli_script.py'}:main", "cli_script.py raised SystemExit: 0")):
        r = CliRunner().invoke(cli, ["train", "--model", spec, "--dataset", "synthetic", "--limit", "20",
                                     "--out", str(tmp_path / "bad")])
        assert r.exit_code == 2 and message in r.stderr and r.stderr.count("Error:") == 1, r.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("change, message", [
    ({"labels": torch.tensor([0.0, 1.0, 0.0, 1.0])}, "its labels are torch.float32 of shape (4,); expected 4 integer"),
    ({"labels": torch.tensor([0, 1, 2, 5])}, "labels 0..5 lie outside its 3 classes"),
    ({"classes": ["cat"]}, "labels 0..1 lie outside its 1 classes"),
    ({"images": torch.rand(4, 3, 8, 8)}, "its images are torch.float32 of shape (4, 3, 8, 8); a saved dataset holds "
                                         "uint8 images"),
    ({"images": torch.zeros(4, 3, 8, 8, dtype=torch.int16)}, "its images are torch.int16"),
])
def test_data_commands_read_a_saved_set_as_every_command_does(change, message, tmp_path):
    path = tmp_path / "set.pt"
    torch.save({"images": torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "labels": torch.tensor([0, 1, 0, 1]),
                "classes": ["cat", "dog", "emu"], **change}, path)
    for args in (["data", "info", path], ["data", "split", path, "--parts", "2", "--out", tmp_path / "a.pt"]):
        r = CliRunner().invoke(cli, [str(a) for a in args])
        assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "a.pt").exists()


def test_an_eval_set_of_another_size_is_resized_as_the_data_is(trained_resnet8, tmp_path):
    r = CliRunner().invoke(cli, ["attack", "--weights", str(trained_resnet8), "--dataset", "synthetic", "--limit",
                                 "20", "--attack", "pgd", "--save-dataset", str(tmp_path / "adv.pt"),
                                 "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["eval", "--weights", str(trained_resnet8), "--dataset", "synthetic", "--limit", "20",
                                 "--image-size", "16", "--eval-sets", f"adv={tmp_path / 'adv.pt'}",
                                 "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "e" / "results.json").read_text())["eval_sets"]["adv"]["n"] > 0


@pytest.mark.slow
def test_sigterm_marks_the_run_failed_as_ctrl_c_does(tmp_path):
    out = tmp_path / "t"
    proc = subprocess.Popen([sys.executable, "-m", "fastablate", "train", "--model", "resnet8", "--dataset",
                             "synthetic", "--epochs", "100", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # until the first epoch is written
        if (out / "metrics.csv").is_file():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and err.strip().endswith("Terminated"), err[-2000:]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "SIGTERM" in info["error"]
