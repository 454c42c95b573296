"""Hostile and mistaken input through the CLI, as a new user gives it.

Every refusal: exit status 2, exactly one ``Error:`` line on stderr, no traceback, nothing
written (``--out`` absent, or an existing run folder unchanged), every input byte-identical.
Every accepted oddity (a hidden file, an odd image size, a class missing from the test
split) is handled by the policy the README states, with a note.
"""
import fcntl
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fastablate.cli import cli
from fastablate.models import build_model, save_checkpoint

SYN = ["--dataset", "synthetic", "--limit", "40", "--batch-size", "20", "--device", "cpu"]


def _image(path: Path, size=16, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    dtype = np.uint16 if mode == "I;16" else np.uint8
    Image.fromarray(rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)).save(path)


def folder(root: Path, train=("a", "b"), test=("a", "b"), per=4, size=16) -> Path:
    for split, classes in (("train", train), ("test", test)):
        for c in classes:
            for i in range(per):
                _image(root / split / c / f"{i}.png", size, seed=hash((split, c, i)) % 1000)
    return root


def digest(*paths) -> dict:
    """Path -> sha256 of every file under the given paths (what 'byte-identical' compares)."""
    out = {}
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()) if p.exists() else []
        out.update({str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files})
    return out


def refused(args, message, *, protect=(), out=None, env=None):
    """Run the CLI and check the refusal contract; returns the error line."""
    protect = [p for p in protect if p is not None]
    before = digest(*protect)
    out_before = digest(out) if out is not None and Path(out).exists() else None
    r = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1 and not any(ln.startswith(("Traceback", "  File")) for ln in lines), r.stderr
    assert message in errors[0], errors[0]
    assert digest(*protect) == before, "an input changed"
    if out is not None:
        assert (digest(out) == out_before) if out_before is not None else not Path(out).exists(), "something written"
    return errors[0]


def ok(args, env=None):
    r = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    assert r.exit_code == 0, (r.output, r.exception)
    return r


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    save_checkpoint(build_model("resnet8", 10), d / "r8.pt")
    return d / "r8.pt"


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """A finished train run on a small image folder (classes a, b; 16x16 images)."""
    d = tmp_path_factory.mktemp("run")
    data = folder(d / "data")
    ok(["train", "--model", "resnet8", "--dataset", "imagefolder", "--data-dir", data, "--epochs", "1",
        "--batch-size", "4", "--out", d / "run"])
    return d / "run", data


# --- silent wrong results ----------------------------------------------------------------
def test_test_split_class_unknown_to_the_train_split(tmp_path):
    data = folder(tmp_path / "d", train=("a", "b"), test=("a", "c"))
    refused(["train", "--model", "resnet8", "--dataset", "imagefolder", "--data-dir", data, "--epochs", "1",
             "--out", tmp_path / "o"], "imagefolder/test has classes that the train split does not know: c",
            protect=[data], out=tmp_path / "o")


def test_eval_classes_are_matched_by_name(train_run, tmp_path):
    run, _ = train_run
    renamed = folder(tmp_path / "renamed", test=("a", "z"))
    refused(["eval", "--weights", run / "model.pt", "--dataset", "imagefolder", "--data-dir", renamed,
             "--out", tmp_path / "o"], f"has classes that checkpoint {run / 'model.pt'} does not know: z",
            protect=[renamed, run], out=tmp_path / "o")
    # A test split holding only class b is scored against output 1 (b), not output 0.
    only_b = folder(tmp_path / "only_b", test=("b",))
    ok(["eval", "--weights", run / "model.pt", "--dataset", "imagefolder", "--data-dir", only_b, "--out",
        tmp_path / "e"])
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert res["classes"] == ["a", "b"] and list(res["per_class"]) == ["b"]  # class a has no images: absent
    assert sum(res["confusion"][1]) == 4 and sum(res["confusion"][0]) == 0


def test_one_odd_image_does_not_resize_the_others(tmp_path):
    data = folder(tmp_path / "d", size=16)
    _image(data / "train" / "a" / "0.png", size=5)  # sorts first: it used to set the size of all
    r = ok(["train", "--model", "resnet8", "--dataset", "imagefolder", "--data-dir", data, "--epochs", "1",
            "--batch-size", "4", "--out", tmp_path / "o"])
    assert "1 of 8 images in imagefolder/train are not 16x16" in r.stderr
    assert torch.load(tmp_path / "o" / "model.pt", weights_only=True)["image_size"] == 16


def test_checkpoint_image_size_is_the_evaluation_size(train_run, tmp_path):
    run, _ = train_run
    big = folder(tmp_path / "big", size=24)
    r = ok(["eval", "--weights", run / "model.pt", "--dataset", "imagefolder", "--data-dir", big, "--out",
            tmp_path / "e"])
    assert "images of 24x24 are resized to the model's 16x16 per batch" in r.stderr


@pytest.mark.parametrize("args, env, message", [
    (["--lr", "nan"], None, "--lr 'nan': is not a finite number"),
    (["--lr", "-0.1"], None, "--lr '-0.1': must be in (0, 100]"),
    ([], {"FASTABLATE_TRAIN_LR": "inf"}, "--lr 'inf' (from FASTABLATE_TRAIN_LR): is not a finite number"),
    (["--momentum", "-1"], None, "--momentum '-1': must be in [0, 1)"),
    (["--weight-decay", "nan"], None, "--weight-decay 'nan': is not a finite number"),
    (["--label-smoothing", "1"], None, "--label-smoothing '1': must be in [0, 1)"),
    (["--mean", "nan,0,0", "--std", "1,1,1"], None, "--mean 'nan,0,0': item nan is not a finite number"),
    (["--mean", "0,0,0", "--std", "0,1,1"], None, "--std '0,1,1': item 0 must be in (0, 1e+06]"),
    (["--seed", "1" * 30], None, f"--seed '{'1' * 30}': is too large"),
    (["--epochs", "1.9"], None, "--epochs '1.9': is not a whole number"),
    ([], {"FASTABLATE_MEMORY_LIMIT": "lots"}, "FASTABLATE_MEMORY_LIMIT='lots': is not a size"),
    (["--data-dir", "x"], None, "dataset synthetic is built in and takes no --data-dir"),
    (["--download"], None, "--download applies to cifar10, cifar100, not to synthetic"),
])
def test_bad_train_values(args, env, message, tmp_path):
    refused(["train", *SYN, "--epochs", "1", *args, "--out", tmp_path / "o"], message, out=tmp_path / "o", env=env)


def test_bad_values_from_a_config_file(tmp_path):
    for text, message in (("lr: .nan\n", "--lr nan (from --config"), ("epochs: 1.9\n", "--epochs 1.9 (from --config"),
                          ("workers: [1, 2]\n", "--workers [1, 2] (from --config")):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        refused(["train", *SYN, "--config", cfg, "--out", tmp_path / "o"], message, protect=[cfg], out=tmp_path / "o")
    cfg.write_bytes(b"lr: \xff\xfe\n")
    refused(["train", *SYN, "--config", cfg, "--out", tmp_path / "o"], "not UTF-8 text", protect=[cfg],
            out=tmp_path / "o")


def test_config_that_is_not_a_small_regular_file(tmp_path):
    """/dev/zero would be read until the kernel kills the process for memory."""
    refused(["train", *SYN, "--config", "/dev/zero", "--out", tmp_path / "o"],
            "--config '/dev/zero': not a regular file (a device, pipe or folder)", out=tmp_path / "o")
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    refused(["eval", *SYN, "--config", fifo, "--out", tmp_path / "o"], "not a regular file", out=tmp_path / "o")
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 120_000 + "epochs: 1\n")
    refused(["train", *SYN, "--config", big, "--out", tmp_path / "o"], "larger than 1 MiB", protect=[big],
            out=tmp_path / "o")


@pytest.mark.parametrize("args, message", [
    (["--attack", "noise", "--lam", "nan"], "--lam 'nan': is not a finite number"),
    (["--attack", "noise", "--lam", "-1"], "--lam '-1': must be in [0, 1e+06]"),
    (["--attack", "pgd", "--eps", "inf"], "--eps 'inf': is not a finite number"),
    (["--restarts", "0"], "--restarts '0': must be in [1, 10000]"),
    (["--attack", "sparse-rs", "--queries", "0"],
     "--queries 0: the random search of sparse-rs needs at least 1 query per image"),
])
def test_bad_attack_values(args, message, ckpt, tmp_path):
    refused(["attack", "--weights", ckpt, *SYN, *args, "--out", tmp_path / "o"], message, protect=[ckpt],
            out=tmp_path / "o")


def test_bad_checkpoints(tmp_path):
    model = build_model("resnet8", 10)
    nan = tmp_path / "nan.pt"
    save_checkpoint(model, nan)
    obj = torch.load(nan, weights_only=True)
    obj["state_dict"]["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(obj, nan)
    zero_std = tmp_path / "std.pt"
    torch.save({**obj, "std": [0.0, 1.0, 1.0], "state_dict": model.net.state_dict()}, zero_std)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("these are not weights\n")
    torch.save({"format": "fastablate", "arch": "resnet8"}, tmp_path / "keyless.pt")
    torch.save({"a": 1}, tmp_path / "nontensor.pt")
    good = torch.load(zero_std, weights_only=True) | {"std": [0.5, 0.5, 0.5]}
    for name, change in (("size-neg", {"image_size": -5}), ("size-huge", {"image_size": 100000}),
                         ("classes0", {"num_classes": 0}), ("dropout", {"dropout": 1.5}),
                         ("names", {"classes": [1] * 10}), ("head", {"head": 3})):
        torch.save(good | change, tmp_path / f"{name}.pt")
    negvar = {k: v.clone() for k, v in model.net.state_dict().items()}
    negvar["layer1.0.bn1.running_var"][3] = -0.5
    torch.save(good | {"state_dict": negvar}, tmp_path / "negvar.pt")
    torch.save(negvar, tmp_path / "negvar-foreign.pt")
    cases = [("nan.pt", "conv1.weight holds NaN or infinite values"), ("std.pt", "is not 1 to 4 finite numbers"),
             ("size-neg.pt", "image_size is -5; expected 8..1024 pixels"),
             ("size-huge.pt", "image_size is 100000; expected 8..1024 pixels"),
             ("classes0.pt", "num_classes is 0; expected 1..100000"),
             ("dropout.pt", "dropout is 1.5; expected a probability in [0, 1)"),
             ("names.pt", "classes are not 10 names, one per output"), ("head.pt", "head is 3; expected a head spec"),
             ("negvar.pt", "layer1.0.bn1.running_var holds a negative variance (-0.5)"),
             ("negvar-foreign.pt", "layer1.0.bn1.running_var holds a negative variance (-0.5)"),
             ("empty.pt", "the file is empty"), ("text.pt", "cannot read checkpoint"),
             ("keyless.pt", "lacks num_classes, image_size, mean, std, state_dict"),
             ("nontensor.pt", "holds no state_dict")]
    for name, message in cases:
        refused(["eval", "--weights", tmp_path / name, *SYN, "--out", tmp_path / "o"], message,
                protect=[tmp_path / name], out=tmp_path / "o")


# --- resume and run directories ----------------------------------------------------------
@pytest.fixture
def trained_syn(tmp_path):
    out = tmp_path / "t"
    ok(["train", "--model", "resnet8", *SYN, "--epochs", "1", "--out", out])
    return out


def test_resume_refuses_another_run(trained_syn):
    for args, message in ((["--lr", "0.05"], "lr was 0.1, now 0.05"), (["--limit", "30"], "limit was 40, now 30"),
                          (["--seed", "1"], "seed was 0, now 1"), (["--model", "plain8"], "model was 'resnet8'")):
        refused(["train", "--model", "resnet8", *SYN, "--epochs", "1", *args, "--resume", "--out", trained_syn],
                message, out=trained_syn)


def test_truncated_resume_state(trained_syn):
    state = trained_syn / "last.pt"
    state.write_bytes(state.read_bytes()[:100])
    refused(["train", "--model", "resnet8", *SYN, "--epochs", "1", "--resume", "--out", trained_syn],
            "--resume: cannot read", out=trained_syn)


def test_out_holding_another_run_or_other_files(trained_syn, ckpt, tmp_path):
    refused(["eval", "--weights", ckpt, *SYN, "--out", trained_syn], "holds a complete train run; choose another",
            protect=[ckpt], out=trained_syn)
    refused(["train", "--model", "resnet8", *SYN, "--epochs", "2", "--out", trained_syn],
            "holds a complete train run with other options (epochs)", out=trained_syn)
    # --force may replace it, but never deletes an input that lies among the run's files.
    refused(["eval", "--weights", trained_syn / "model.pt", *SYN, "--force", "--out", trained_syn],
            "is a file this run writes into --out", out=trained_syn)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    refused(["eval", "--weights", ckpt, *SYN, "--out", mine], "holds files that are not a fastablate run (notes.txt)",
            out=mine)
    ok(["eval", "--weights", ckpt, *SYN, "--force", "--out", mine])
    assert (mine / "notes.txt").read_text() == "my notes" and (mine / "results.json").is_file()


def test_rerun_replaces_its_own_run_and_stale_temporaries(trained_syn):
    (trained_syn / ".run.json.x1y2.tmp").write_text("half")
    ok(["train", "--model", "resnet8", *SYN, "--epochs", "1", "--out", trained_syn])
    assert not list(trained_syn.glob("*.tmp"))


def test_out_being_written_by_another_process(ckpt, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running fastablate holds
    try:
        refused(["eval", "--weights", ckpt, *SYN, "--out", out], "is being written by another fastablate process",
                out=out)
    finally:
        os.close(fd)


def test_out_that_cannot_be_made_or_written(ckpt, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(["eval", "--weights", ckpt, *SYN, "--out", afile], "is a file, not a folder", protect=[afile])
    refused(["eval", "--weights", ckpt, *SYN, "--out", afile / "sub"], "cannot create it (Not a directory)",
            protect=[afile])

    import fastablate.rundir as results

    def full(path, text):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(results, "atomic_write_text", full)
    out = tmp_path / "full"
    r = CliRunner().invoke(cli, ["eval", "--weights", str(ckpt), *SYN, "--out", str(out)])
    assert r.exit_code == 2 and r.stderr.strip() == f"Error: cannot write {out / 'run.json'}: No space left on device"


def test_outputs_get_the_mode_of_ordinary_files(ckpt, tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        r = CliRunner().invoke(cli, ["eval", "--weights", str(ckpt), *SYN, "--out", str(tmp_path / "o")])
    finally:
        os.umask(mask)
    assert r.exit_code == 0, r.output
    files = [p for p in (tmp_path / "o").rglob("*") if p.is_file()]
    assert files and {p.stat().st_mode & 0o777 for p in files} == {0o644}


def test_save_dataset_never_overwrites_an_input(ckpt, tmp_path):
    refused(["attack", "--weights", ckpt, *SYN, "--save-dataset", ckpt, "--out", tmp_path / "o"],
            "is the --weights input", protect=[ckpt], out=tmp_path / "o")


# --- image files -------------------------------------------------------------------------
def test_unreadable_images_are_named(tmp_path):
    data = folder(tmp_path / "d")
    bad = data / "train" / "a" / "x.jpg"
    _image(bad.with_suffix(".src.jpg"))
    cases = [(bad.with_suffix(".src.jpg").read_bytes()[:60], "Image is incomplete or truncated"),
             (b"this is text\n", "is not a readable image"), (b"", "is not a readable image")]
    for content, message in cases:
        bad.write_bytes(content)
        refused(["train", "--model", "resnet8", "--dataset", "imagefolder", "--data-dir", data, "--out",
                 tmp_path / "o"], f"{bad}", protect=[data], out=tmp_path / "o")
        assert message


def test_hidden_files_folders_and_16_bit_images_follow_the_policy(tmp_path):
    data = folder(tmp_path / "d")
    (data / "train" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (data / "train" / "a" / "dir.png").mkdir()
    _image(data / "train" / "b" / "deep.png", mode="I;16")
    _image(data / "train" / "b" / "gray.png", mode="L")
    r = ok(["train", "--model", "resnet8", "--dataset", "imagefolder", "--data-dir", data, "--epochs", "1",
            "--batch-size", "4", "--out", tmp_path / "o"])
    assert "skipped 2 hidden files or folders with image names" in r.stderr
    assert json.loads((tmp_path / "o" / "run.json").read_text())["status"] == "complete"


def test_model_too_deep_for_the_image_size(tmp_path):
    data = folder(tmp_path / "d", size=16)
    refused(["train", "--model", "vgg11", "--dataset", "imagefolder", "--data-dir", data, "--out", tmp_path / "o"],
            "model vgg11 cannot take 16x16 images", protect=[data], out=tmp_path / "o")


# --- options that would do nothing -------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--noise-every", "99", "--noise-sigma", "1"], "--noise-every 99: resnet8 has 7 conv layers"),
    (["--noise-p", "0.5"], "--noise-p applies to the noise study"),
    (["--input-noise", "1", "--noise-p", "0.5"], "--noise-p applies to noise on conv layers"),
    (["--lesion", "all-single", "--samples", "3"], "--samples applies to --lesion k-random and reorder"),
    (["--k", "2"], "--k applies to the lesion study (--lesion), which is not given"),
])
def test_options_that_would_do_nothing(args, message, ckpt, tmp_path):
    refused(["eval", "--weights", ckpt, *SYN, *args, "--out", tmp_path / "o"], message, protect=[ckpt],
            out=tmp_path / "o")


def test_datasets_listing_gives_true_split_sizes():
    from fastablate.data import build_dataset
    out = CliRunner().invoke(cli, ["datasets"]).output
    line = next(ln for ln in out.splitlines() if ln.startswith("digits"))
    assert f"{len(build_dataset('digits', None, 'train'))}/{len(build_dataset('digits', None, 'test'))}" in line


@pytest.mark.parametrize("study", [["eval"], ["eval", "--lesion", "all-single"],
                                   ["eval", "--noise-layers", "1", "--noise-sigma", "0.5"],
                                   ["attack", "--attack", "fgsm"], ["features"], ["paths"]])
def test_nan_logits_are_an_error_naming_where_they_start(study, tmp_path):
    """Finite weights whose forward pass overflows: every study stops, naming the layer."""
    model = build_model("resnet8", 10)
    model.net.layer2[0].conv1.weight.data.fill_(3e38)
    path = tmp_path / "overflow.pt"
    save_checkpoint(model, path)
    data = SYN if study[0] != "paths" else [a for a in SYN if a not in ("--batch-size", "20")]
    refused([*study, "--weights", path, *data, "--out", tmp_path / "o"],
            "resnet8 gives NaN or infinite logits on these images; they start at layer net.layer2.0.conv1 (Conv2d)",
            protect=[path], out=tmp_path / "o")


def test_nan_logits_past_the_first_image_stop_the_study():
    from fastablate.data import ImageSet
    from fastablate.engines.core.runtime import Runtime
    from fastablate.engines.studies.evaluation import evaluate
    from fastablate.errors import FastablateError
    model = build_model("resnet8", 10, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    model.net.conv1.weight.data.fill_(3e38)  # a black image stays finite, a bright one overflows
    images = torch.stack([torch.zeros(3, 32, 32, dtype=torch.uint8), torch.full((3, 32, 32), 255, dtype=torch.uint8)])
    ds = ImageSet("two", "test", torch.tensor([0, 1]), [str(i) for i in range(10)], (0, 0, 0), (1, 1, 1), 32,
                  images=images)
    with pytest.raises(FastablateError, match=r"they start at layer net.conv1 \(Conv2d\)"):
        evaluate(model, ds, Runtime(batch_size=2))


# --- faults while writing, runs that go wrong ------------------------------------------------
def test_full_disk_while_saving_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    """The disk fills up during epoch 2's save: one Error line, exit 2, epoch 1's model.pt and
    last.pt intact, and --resume finishes the run once there is space again."""
    import errno

    from fastablate import files
    from fastablate.engines.studies import train_loop as trainer
    out = tmp_path / "t"
    args = ["train", "--model", "resnet8", *SYN, "--epochs", "2", "--out", out]
    full = {"on": False}
    real_eval, real_write = trainer.evaluate, files._Writes.write

    def evaluate(*a, **k):  # epoch 2's evaluation: then the disk is full
        if trainer.evaluate.calls == 1:
            full["on"] = True
        trainer.evaluate.calls += 1
        return real_eval(*a, **k)
    evaluate.calls = 0

    def write(self, data):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)
    monkeypatch.setattr(trainer, "evaluate", evaluate)
    monkeypatch.setattr(files._Writes, "write", write)
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 2, (r.output, r.exception)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error: ")]
    assert errors == [f"Error: cannot write {out / 'model.pt'}: the disk is full; model.pt is unchanged"], r.stderr
    assert torch.load(out / "model.pt", weights_only=True)["meta"]["epoch"] == 1
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0
    assert not (out / "results.json").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    r = ok([*args, "--resume"])
    assert "epoch 2/2" in r.output and torch.load(out / "model.pt", weights_only=True)["meta"]["epoch"] == 2


@pytest.mark.slow
def test_file_size_limit_is_one_error_line(tmp_path):
    """ulimit -f below the checkpoint's size: the write fails with EFBIG (Python ignores SIGXFSZ)."""
    import resource
    import subprocess
    import sys
    out = tmp_path / "t"
    code = ("import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000));"
            "from fastablate.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code, "train", "--model", "resnet8", *SYN, "--epochs", "1", "--out",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (f"Error: cannot write {out / 'model.pt'}: the file would exceed this "
                                                 "process's file-size limit (ulimit -f); model.pt was not written")
    assert "Traceback" not in r.stderr and not (out / "model.pt").exists()
    assert resource.getrlimit(resource.RLIMIT_FSIZE)  # the limit applied to the child only


@pytest.mark.slow
def test_diverging_training_is_said_once_and_recorded(tmp_path):
    out = tmp_path / "d"
    r = ok(["train", "--model", "resnet8", "--dataset", "synthetic", "--limit", "100", "--device", "cpu",
            "--epochs", "3", "--lr", "5", "--out", out])  # test loss ~1e2, then ~1e11 here
    said = [ln for ln in r.stderr.splitlines() if "training is diverging" in ln]
    assert len(said) == 1 and said[0].startswith("note: training is diverging: the ")
    assert json.loads((out / "run.json").read_text())["warnings"] == [said[0].removeprefix("note: ")]
    calm = tmp_path / "c"
    ok(["train", "--model", "resnet8", *SYN, "--epochs", "2", "--out", calm])
    assert "warnings" not in json.loads((calm / "run.json").read_text())
