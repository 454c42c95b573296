"""fastablate robust: the protocol's five steps as run directories, reused on rerun; the
five-set table; disjoint sets; bad input."""
import json

import pytest
import torch
from click.testing import CliRunner

from fastablate.cli import cli

ARGS = ["--model", "resnet8", "--dataset", "synthetic", "--limit", "100", "--epochs", "1", "--lrs", "0.01",
        "--train-successes", "20", "--val-successes", "8", "--ood-successes", "4", "--pixels", "0.02",
        "--perturbed", "6", "--retrain-epochs", "1", "--retrain-inits", "baseline,none", "--device", "cpu"]


@pytest.mark.slow
def test_the_protocol_end_to_end_and_reused_on_rerun(tmp_path, trained_resnet8):
    out = tmp_path / "r"
    args = [*ARGS, "--init", str(trained_resnet8)]  # a baseline the attacks can fool
    r = CliRunner().invoke(cli, ["robust", *args, "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    doc = json.loads((out / "results.json").read_text())
    table = doc["five_sets"]
    assert [row["model"] for row in table] == ["baseline", "final"]
    assert set(table[0]) == {"model", "original validation", "perturbed-train", "perturbed-val", "holdout", "ood"}
    assert table[0]["perturbed-train"] == 0.0  # made against the baseline: it is fooled by all of them
    sets = {n: torch.load(out / "sets" / f"{n}.pt", weights_only=True) for n in
            ("augment", "perturbed-train", "perturbed-val", "holdout", "ood")}
    assert len(sets["augment"]["labels"]) == 14 and len(sets["perturbed-train"]["labels"]) == 6
    assert len(sets["perturbed-val"]["labels"]) + len(sets["holdout"]["labels"]) == 8
    for a, b in (("augment", "perturbed-train"), ("perturbed-val", "holdout")):  # disjoint sources
        assert not set(sets[a]["index"].tolist()) & set(sets[b]["index"].tolist())
    for row, part in zip(table, ("eval-baseline", "eval-final")):  # the table is the parts' numbers
        doc_part = json.loads((out / part / "results.json").read_text())
        assert row["original validation"] == doc_part["accuracy"]
        assert all(row[n] == doc_part["eval_sets"][n]["accuracy"] for n in ("perturbed-train", "perturbed-val",
                                                                             "holdout", "ood"))
    from fastablate.models import load_model
    baseline = load_model(doc["baseline"]).eval()
    for name in ("adv-train", "adv-val", "adv-ood"):  # successes only: the baseline is fooled by them
        saved = torch.load(out / f"{name}.pt", weights_only=True)
        assert "success" not in saved
        with torch.no_grad():
            pred = baseline(saved["images"].float() / 255).argmax(1)
        assert (pred != saved["labels"]).float().mean() >= 0.9  # 8-bit rounding may undo a few
    point = json.loads((out / "retrain" / "results.json").read_text())["points"]
    assert {p["init"] for p in point} == {doc["baseline"], "none"}
    assert {"trajectory.png"} <= {p.name for p in (out / "attack-ood" / "plots").iterdir()}
    assert "The five sets, before and after" in (out / "report.md").read_text()
    assert (out / "report.html").stat().st_size > 10_000
    r = CliRunner().invoke(cli, ["robust", *args, "--out", str(out)])  # every step reused
    assert r.exit_code == 0 and r.output.count("finished already, reused") == 6
    assert "2 complete already), 0 to run" in r.output


def test_bad_protocol_options(tmp_path, trained_resnet8):
    r = CliRunner().invoke(cli, ["data", "split", str(trained_resnet8), "--parts", "1", "--out",
                                 str(tmp_path / "a.pt")])
    assert r.exit_code == 2 and "model.pt: not a saved dataset" in r.stderr and not (tmp_path / "a.pt").exists()
    r = CliRunner().invoke(cli, ["robust", *ARGS, "--perturbed", "20", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--perturbed 20 leaves no augmentation examples" in r.stderr
    r = CliRunner().invoke(cli, ["robust", *ARGS, "--retrain-inits", "scratch", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--retrain-inits 'scratch'" in r.stderr
    # What a later step would refuse is refused before the first (the baseline grid) runs.
    for args, message in ((["--train-successes", "2000"], "--train-successes 2000: the train split of synthetic holds "
                                                          "1000 images"),
                          (["--init", "none", "--retrain-inits", "baseline,imagenet"],
                           "--retrain-inits imagenet: no ImageNet weights for resnet8")):
        r = CliRunner().invoke(cli, ["robust", *ARGS, *args, "--out", str(tmp_path / "x")])
        assert r.exit_code == 2 and message in r.stderr, r.output
    assert not (tmp_path / "x").exists()


def test_the_protocol_configs_parse(tmp_path):
    """The two configs are valid robust options (checked before anything runs: a bad option
    would be an error line here); the data they name is absent, so each stops there."""
    from pathlib import Path
    for name in ("robust-training-tinyimagenet", "robust-training-cifar10"):
        path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
        r = CliRunner().invoke(cli, ["robust", "--config", str(path), "--data-dir", str(tmp_path / "none"),
                                     "--out", str(tmp_path / name)])
        assert r.exit_code == 2 and r.stderr.startswith("Error: dataset") and "no " in r.stderr, r.stderr
        assert not (tmp_path / name).exists()
