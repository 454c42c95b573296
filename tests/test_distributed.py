"""torchrun: 2- and 3-process gloo jobs on the CPU give the single-process results (the same batches
at the same thread count: the same bits; counts gathered and summed in batch order), the studies in
one launch per process count;
training is deterministic for a seed and world size; bad input stops every process."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastablate.models import load_model

pytestmark = pytest.mark.slow  # every test launches processes

SYN = ["--dataset", "synthetic", "--limit", "50", "--batch-size", "20", "--device", "cpu"]


def fastablate(*args, procs: int = 1, code: int = 0) -> subprocess.CompletedProcess:
    """Run the CLI in fresh processes: plain, or under torchrun with ``procs`` processes."""
    launcher = [sys.executable, "-m", "fastablate"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
        "-m", "fastablate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(launcher + [str(a) for a in args], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == code, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def results(path) -> dict:
    return json.loads((path / "results.json").read_text())


STUDY = ["study", "--only", "eval,lesion,noise,attack", "--samples", "3", "--trials", "2", "--eval-limit", "50",
         "--attack-limit", "20"]


@pytest.fixture(scope="module")
def one_process(trained_resnet8, tmp_path_factory):
    """The studies in one process, in one launch (`fastablate study` runs them as its parts)."""
    out = tmp_path_factory.mktemp("one") / "study"
    fastablate(*STUDY, "--weights", trained_resnet8, *SYN, "--out", out)
    return out


def _timeless(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("seconds", "seconds_per_image")}


def test_studies_under_torchrun_equal_one_process(one_process, trained_resnet8, tmp_path):
    fastablate(*STUDY, "--weights", trained_resnet8, *SYN, "--out", tmp_path / "two", procs=2)
    for part in ("eval", "lesion", "noise", "attack-sparse", "attack-noise"):
        assert _timeless(results(tmp_path / "two" / part)) == _timeless(results(one_process / part)), part
        info = json.loads((tmp_path / "two" / part / "run.json").read_text())
        assert info["world_size"] == 2 and info["status"] == "complete", part
    adv1, adv2 = (torch.load(d / "attack-sparse" / "adversarial.pt", weights_only=True)
                  for d in (one_process, tmp_path / "two"))
    assert all(torch.equal(adv1[k], adv2[k]) for k in adv1)
    assert (tmp_path / "two" / "report.html").is_file()


def test_three_processes_on_a_set_they_do_not_divide(one_process, trained_resnet8, tmp_path):
    # 50 images in batches of 20: 3 batches for 3 processes, the last one short.
    fastablate("eval", "--weights", trained_resnet8, *SYN, "--out", tmp_path / "three", procs=3)
    one, three = results(one_process / "eval"), results(tmp_path / "three")
    assert one["confusion"] == three["confusion"] and sum(map(sum, three["confusion"])) == 50
    assert one["loss"] == pytest.approx(three["loss"], rel=1e-12)


def test_training_under_torchrun_is_deterministic_and_saves_what_it_reports(tmp_path):
    args = ["train", "--model", "resnet8", *SYN, "--epochs", "1"]
    out = fastablate(*args, "--out", tmp_path / "a", procs=2)
    assert out.stdout.count("epoch 1/1") == 1  # one process prints
    fastablate(*args, "--out", tmp_path / "b", procs=2)
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True)["state_dict"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    fastablate("eval", "--weights", tmp_path / "a" / "model.pt", *SYN, "--out", tmp_path / "e")
    assert results(tmp_path / "e")["accuracy"] == results(tmp_path / "a")["accuracy"]
    assert load_model(tmp_path / "a" / "model.pt").meta["world_size"] == 2
    assert json.loads((tmp_path / "a" / "run.json").read_text())["world_size"] == 2


def test_bad_input_under_torchrun_stops_every_process(trained_resnet8, tmp_path):
    out = fastablate("eval", "--weights", trained_resnet8, "--dataset", "synthetic", "--limit", "2",
                     "--out", tmp_path / "o", procs=3, code=1)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("Error: ")]
    assert errors == ["Error: torchrun runs 3 processes but synthetic has 2 images: use at most 2 processes"]
    assert out.stderr.count("exitcode  : 2") == 3 and not (tmp_path / "o").exists()
    out = fastablate("train", *SYN, "--sync-bn", "--out", tmp_path / "s", code=2)
    assert out.stderr.strip() == "Error: --sync-bn applies under torchrun (more than one process)"


def test_bad_option_under_torchrun_every_process_exits_2(tmp_path):
    """A value refused while parsing, before any process group, with one process 3 s behind the
    other: each still exits 2 itself (torchrun stops the others as soon as the first ends)."""
    slow = tmp_path / "slow-rank-1"
    slow.write_text(f'#!/bin/sh\n[ "$LOCAL_RANK" = 1 ] && sleep 3\nexec {sys.executable} -m fastablate "$@"\n')
    slow.chmod(0o755)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
           str(slow), "eval", "--model", "resnet8", *SYN, "--batch-size", "0", "--out", str(tmp_path / "o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("Error: ")]
    assert errors == ["Error: --batch-size '0': must be in [1, 1048576]"], out.stderr[-2000:]
    # Each process exited 2 itself (one stopped by torchrun would show exitcode -15). torchrun may
    # still log a SIGTERM to the second, sent while that one was already exiting: not checked.
    assert out.stderr.count("exitcode  : 2") == 2 and not (tmp_path / "o").exists()
