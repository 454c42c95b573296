"""fastablate study end to end on a tiny setting: every part, a report that refers only to
files that exist, verdicts that match the numbers, reuse of finished parts; the HTML in a
real headless browser when Chromium is installed."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from fastablate.cli import cli
from fastablate.engines.workflows.report import lesion_finding, noise_finding

TINY = ["--dataset", "synthetic", "--limit", "120", "--models", "resnet14,plain14", "--epochs", "1",
        "--attack-limit", "20", "--samples", "3", "--trials", "2", "--images", "2", "--noise-sigma", "0.5,1"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    r = CliRunner().invoke(cli, ["study", *TINY, "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    return out, r.output


@pytest.mark.slow
def test_every_part_is_a_complete_run(study):
    out, output = study
    for part in ("train-resnet14", "train-plain14", "eval", "lesion", "noise", "attack-sparse", "attack-noise",
                 "paths", "features"):
        info = json.loads((out / part / "run.json").read_text())
        assert info["status"] == "complete" and (out / part / "results.json").is_file(), part
    assert json.loads((out / "run.json").read_text())["command"] == "study"
    assert "report: " in output and "## Lesion" in output


@pytest.mark.slow
def test_report_refers_only_to_existing_files(study):
    out, _ = study
    md = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) >= 8 and all((out / link).is_file() for link in links)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(links) and "src=\"/" not in html and "http" not in html


@pytest.mark.slow
def test_verdicts_match_the_numbers(study):
    out, _ = study
    lesion = json.loads((out / "lesion" / "results.json").read_text())
    noise = json.loads((out / "noise" / "results.json").read_text())
    md = (out / "report.md").read_text()
    f = lesion_finding(lesion, out, 0.1)
    assert f.verdict in md
    singles = [v["accuracy"] for v in lesion["variants"] if v["plan"] == "all-single"]
    assert f.table[0]["one unit deleted (mean)"] == pytest.approx(sum(singles) / len(singles))
    ref, other = f.table[0]["retained"], f.table[1]["retained"]
    expected = ("holds" if ref >= 0.9 and other <= 0.5 else "holds in part" if ref >= other + 0.1
                else "does not hold")
    assert f.status == expected and f"**Verdict ({expected}).**" in md
    g = noise_finding(noise, out)
    assert g.verdict in md
    attack = json.loads((out / "attack-sparse" / "results.json").read_text())
    assert f"fools {attack['success_rate']:.2f} of resnet14's {attack['attacked']} correctly classified" in md


@pytest.mark.slow
def test_rerun_reuses_finished_parts(study, tmp_path):
    out, _ = study
    r = CliRunner().invoke(cli, ["study", *TINY, "--out", str(out), "--only", "eval,lesion"])
    assert r.exit_code == 0, r.output
    assert "eval: finished already, reused" in r.output and "lesion: finished already, reused" in r.output
    assert "noise" not in r.output.split("## ")[0]  # --only: the other parts are not run


@pytest.mark.slow
def test_shared_options_a_part_does_not_take(study):
    out, _ = study
    # paths stacks --sets, not batches: a study's --batch-size does not reach it (nor change its run).
    r = CliRunner().invoke(cli, ["study", *TINY, "--out", str(out), "--only", "paths", "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    assert "paths: finished already, reused" in r.output


@pytest.mark.parametrize("args, message", [
    (["--only", "lesion", "--skip", "noise"], "--only and --skip both choose the parts"),
    (["--only", "bogus"], "--only 'bogus': item bogus is not one of: train, eval"),
    (["--models", "resnet8,resnet8"], "--models resnet8,resnet8 names a model twice"),
    (["--trials", "1"], "--trials '1': must be in [2, 10000]"),
])
def test_bad_study_input(args, message, tmp_path):
    r = CliRunner().invoke(cli, ["study", "--dataset", "synthetic", *args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_a_headless_browser(study, tmp_path):
    out, _ = study
    shot = tmp_path / "report.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1200,2400", f"--screenshot={shot}", (out / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2400)
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 200  # tables and figures drawn, not a blank page
    Path(out / "report-screenshot.png").write_bytes(shot.read_bytes())


SMALLER = {"resnet34": "resnet8", "vgg19": "vgg11"}
STUDY_CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")
                       if "fastablate study --config" in p.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: p.name)
def test_experiment_configs_run(path, tmp_path):
    """Each experiment's config runs as `fastablate study --config`, here on tiny data, one epoch."""
    import yaml
    out = tmp_path / "s"
    conf = yaml.safe_load(path.read_text())
    models = conf["models"].split(",")
    # The plumbing, with small models of each family: a 110-layer pre-activation net after one step
    # on 40 images still has its initial BatchNorm statistics, which its grown activations overflow
    # at test time (the same family at depth 20), and ResNet-34 and VGG19 take a minute here.
    models = [SMALLER.get(m, m.replace("110", "20")) for m in models]
    r = CliRunner().invoke(cli, ["study", "--config", str(path), "--dataset", "synthetic", "--limit", "40",
                                 "--epochs", "1", "--eval-limit", "20", "--samples", "1", "--trials", "2",
                                 "--images", "1", "--models", ",".join(models), "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    for m in models:
        assert json.loads((out / f"train-{m}" / "run.json").read_text())["status"] == "complete"
    for part in conf["only"].split(","):
        if part != "train":
            assert (out / part / "results.json").is_file(), part
    if "stochastic-depth" in conf:
        sd = out / f"train-{models[0]}-sd{conf['stochastic-depth']:g}"
        assert json.loads((sd / "run.json").read_text())["config"]["stochastic_depth"] == conf["stochastic-depth"]
        lesion = json.loads((out / "lesion" / "results.json").read_text())
        sd_name = f"{models[0]} (stochastic depth {conf['stochastic-depth']:g})"
        assert lesion["compare"][-1]["model"] == sd_name
    if "noise-p" in conf:
        noise = json.loads((out / "noise" / "results.json").read_text())
        ps = {g["p"] for g in noise["grid"] if g["kind"] == "activation"}
        assert ps == set(map(float, conf["noise-p"].split(",")))
        features = json.loads((out / "features" / "results.json").read_text())
        assert features["noise"]["sigma"] == max(map(float, str(conf["noise-sigma"]).split(",")))
    if conf.get("keep") == "best":
        for m in models:
            assert json.loads((out / f"train-{m}" / "run.json").read_text())["kept"]["by"] == "val_accuracy"
    assert (out / "report.html").is_file()
