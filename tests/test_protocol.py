"""The study protocol: a new study is one class and one registration, and the CLI gains its
command, options, validation, --compare and run directory from them."""
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fastablate.cli import cli
from fastablate.engines import register_study, unregister_study
from fastablate.engines.core.protocol import Study
from fastablate.engines.core.runtime import batch_progress, model_name
from fastablate.engines.core.spec import Float, Spec, option
from fastablate.models import build_model, save_checkpoint


@dataclass(frozen=True)
class MeanLogitSpec(Spec):
    scale: float = option(1.0, "Multiply the mean logit by this.", type=Float(0, 100, min_open=True))


@dataclass
class MeanLogit:
    model: str
    value: float

    def to_dict(self):
        return {"model": self.model, "mean_logit": self.value}

    def rows(self):
        return [self.to_dict()]

    def plot(self, directory: Path, *others):
        path = directory / "mean-logit.txt"
        path.write_text("\n".join(f"{r.model} {r.value}" for r in (self, *others)))
        return [path]


class MeanLogitStudy(Study):
    """The mean logit of a model over the images, times --scale."""

    name, command, spec_class = "toy", "toy", MeanLogitSpec

    def run(self, model, data, spec, runtime):
        with torch.no_grad():
            total = sum(model(x).sum().item() for x, _ in batch_progress(data, runtime, "toy"))
        return MeanLogit(model_name(model), spec.scale * total / (len(data) * data.num_classes))


@pytest.fixture
def toy():
    register_study(MeanLogitStudy())
    yield
    unregister_study("toy")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    save_checkpoint(build_model("resnet8"), d / "a.pt")
    save_checkpoint(build_model("resnet8"), d / "b.pt")
    return d


def test_toy_study_runs_through_the_cli_with_compare(toy, weights, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["toy", "--weights", str(weights / "a.pt"), "--compare", str(weights / "b.pt"),
                                 "--scale", "2", "--dataset", "synthetic", "--limit", "20", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == "resnet8" and res["compare"]["model"] == "resnet8 (b.pt)"
    assert res["mean_logit"] != res["compare"]["mean_logit"]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["config"]["scale"] == 2.0 and run["config"]["study"] == "toy"
    assert (out / "plots" / "mean-logit.txt").read_text().count("\n") == 1
    assert len((out / "results.csv").read_text().splitlines()) == 3
    assert "results: " in r.output and "mean_logit" in r.output
    assert "toy" in CliRunner().invoke(cli, ["--help"]).output
    assert "--scale" in CliRunner().invoke(cli, ["toy", "--help"]).output


def test_toy_study_validates_from_its_spec(toy, weights, tmp_path):
    for value, message in (("-1", "--scale '-1': must be in (0, 100]"), ("x", "--scale 'x': is not a number")):
        r = CliRunner().invoke(cli, ["toy", "--weights", str(weights / "a.pt"), "--scale", value,
                                     "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and r.stderr.strip() == f"Error: {message}", r.stderr
    env = {"FASTABLATE_TOY_SCALE": "inf"}
    r = CliRunner().invoke(cli, ["toy", "--weights", str(weights / "a.pt"), "--out", str(tmp_path / "o")], env=env)
    assert r.stderr.strip() == "Error: --scale 'inf' (from FASTABLATE_TOY_SCALE): is not a finite number"
    assert not (tmp_path / "o").exists()
