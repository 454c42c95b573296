"""A rerun reuses finished work only when what it read is unchanged: a checkpoint replaced at
the same path, a saved set written again with other images, a dataset folder with an image
more; and a step downstream of a redone one is redone."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import randomize_bn

from fastablate.cli import cli
from fastablate.files import fingerprint
from fastablate.models import build_model, save_checkpoint

SYN = ["--dataset", "synthetic", "--limit", "40", "--batch-size", "20", "--device", "cpu"]


def run(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def results(path) -> dict:
    return json.loads((path / "results.json").read_text())


@pytest.fixture
def other_weights(tmp_path):
    """A checkpoint of the same model as trained_resnet8, untrained: another accuracy."""
    torch.manual_seed(3)
    path = tmp_path / "untrained.pt"
    save_checkpoint(randomize_bn(build_model("resnet8", mean=(0.5,) * 3, std=(0.25,) * 3)), path)
    return path


def test_fingerprints_follow_the_bytes_not_the_path(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 3_000_000)
    b.write_bytes(b"x" * 2_999_999 + b"y")  # the same size, the last byte differs (past the first MiB)
    assert fingerprint(a) != fingerprint(b)
    before = fingerprint(a)
    a.write_bytes(b"x" * 3_000_000)  # written again, the same bytes
    assert fingerprint(a) == before and fingerprint(tmp_path / "gone") == "missing"
    folder = tmp_path / "data" / "train" / "cat"
    folder.mkdir(parents=True)
    (folder / "1.png").write_bytes(b"")
    seen = fingerprint(tmp_path / "data")
    (folder / "2.png").write_bytes(b"")
    assert fingerprint(tmp_path / "data") != seen


def test_sweep_reruns_a_point_whose_checkpoint_was_replaced(trained_resnet8, other_weights, tmp_path):
    weights = tmp_path / "model.pt"
    shutil.copy(trained_resnet8, weights)
    sweep = ["sweep", "--grid", "batch-size=10,20", "--out", tmp_path / "s", "--", "eval", "--weights", weights,
             "--dataset", "synthetic", "--limit", "40", "--device", "cpu"]
    run(*sweep)
    first = [p["accuracy"] for p in results(tmp_path / "s")["points"]]
    assert "2 complete already" in run(*sweep).output  # nothing changed: reused
    shutil.copy(other_weights, weights)  # retrained in place, as it were
    assert "0 complete already), 2 to run" in run(*sweep).output
    now = [p["accuracy"] for p in results(tmp_path / "s")["points"]]
    run("eval", "--weights", weights, *SYN, "--out", tmp_path / "e")
    assert now == [results(tmp_path / "e")["accuracy"]] * 2 and now != first


def test_study_redoes_the_parts_of_a_replaced_checkpoint(trained_resnet8, other_weights, tmp_path):
    weights = tmp_path / "model.pt"
    shutil.copy(trained_resnet8, weights)
    study = ["study", "--weights", weights, "--dataset", "synthetic", "--limit", "40", "--eval-limit", "40",
             "--only", "eval,lesion", "--samples", "2", "--out", tmp_path / "s"]
    run(*study)
    assert run(*study).output.count("finished already, reused") == 2
    shutil.copy(other_weights, weights)
    r = run(*study)
    assert "finished already" not in r.output
    run("eval", "--weights", weights, *SYN, "--out", tmp_path / "e")
    assert results(tmp_path / "s" / "eval")["accuracy"] == results(tmp_path / "e")["accuracy"]


def test_a_changed_data_folder_or_eval_set_redoes_the_point(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    g = torch.Generator().manual_seed(0)

    def image(path):
        Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()).save(path)
    for split in ("train", "test"):
        for c in range(2):
            (data / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                image(data / split / f"c{c}" / f"{i}.png")
    sweep = ["sweep", "--grid", "epochs=1", "--out", tmp_path / "s", "--", "train", "--model", "resnet8",
             "--dataset", "imagefolder", "--data-dir", data, "--device", "cpu"]
    run(*sweep)
    assert "1 complete already" in run(*sweep).output
    image(data / "test" / "c1" / "9.png")
    run(*sweep)
    assert results(tmp_path / "s")["points"][0]["status"] == "complete"
    point = next((tmp_path / "s" / "points").iterdir())
    assert results(point)["test"]["n"] == 9  # the image added is counted


@pytest.mark.slow
def test_robust_redoes_every_step_after_the_one_whose_options_changed(trained_resnet8, tmp_path):
    """Another --val-successes redoes the validation attack and the sets split from it; the
    retraining points and evaluations that read those sets are redone, and the five-set table
    counts the new sets."""
    args = ["--model", "resnet8", "--dataset", "synthetic", "--limit", "100", "--epochs", "1", "--lrs", "0.01",
            "--train-successes", "20", "--ood-successes", "4", "--pixels", "0.02", "--perturbed", "6",
            "--retrain-epochs", "1", "--retrain-inits", "baseline", "--device", "cpu", "--init", trained_resnet8,
            "--out", tmp_path / "r"]
    run("robust", *args, "--val-successes", "8")
    before = results(tmp_path / "r" / "eval-final")["eval_sets"]["holdout"]["n"]
    r = run("robust", *args, "--val-successes", "12")
    assert "attack-train: finished already, reused" in r.output and "attack-val: finished already" not in r.output
    assert "(0 complete already)" in r.output.split("robust: retraining")[1]  # the retraining points redone
    assert "eval-final: finished already" not in r.output
    after = results(tmp_path / "r" / "eval-final")["eval_sets"]
    sets = {n: len(torch.load(tmp_path / "r" / "sets" / f"{n}.pt", weights_only=True)["labels"])
            for n in ("perturbed-val", "holdout")}
    assert after["holdout"]["n"] == sets["holdout"] and sets["perturbed-val"] + sets["holdout"] == 12
    assert after["holdout"]["n"] != before
