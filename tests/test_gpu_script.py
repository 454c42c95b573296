"""bench/gpu.sh, the one command for a GPU machine: every step at toy size on the CPU (--dry-run),
so it cannot rot while no GPU is around, and its refusals."""
import json
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu.sh"


def gpu_sh(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gpu"
    r = gpu_sh("--dry-run", "--minutes", "8", "--out", out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for heading in ("## Build", "## Tests on cpu", "## Kernel benchmarks on cpu",
                    "## Veit et al. 2016 on converged networks: preresnet14 vs preplain14"):
        assert heading in summary, heading
    assert "- kernel-tests: `pytest" in summary and "- engine-tests: `pytest" in summary
    assert summary.count("`: exit 0 in") == 2 and "exit 0 in" in summary.split("## Kernel benchmarks")[1]
    assert "| block_skip cpu 8x16x32x32 | fastablate |" in summary
    assert ": cut**" not in summary and "Cut to meet the budget" not in summary
    doc = json.loads((out / "veit.json").read_text())
    assert {"setup", "training", "trained", "lesion", "paths", "noise", "speed_device", "executor"} <= set(doc)
    resnet, plain = doc["lesion"]
    assert [u["unit"] for u in resnet["single"] if u["downsampling"]] == ["layer2.0", "layer3.0"]
    assert plain["unlesionable"] and list(resnet["k_curve"]) == ["1", "2"]  # JSON keys
    assert doc["trained"]["preresnet14"]["epochs"] == 2 and doc["executor"]["variants"] == 7
    assert (out / "runs" / "train-preresnet14" / "model.pt").is_file() and (out / "runs" / "lesion").is_dir()


@pytest.mark.parametrize("args, message", [
    (["--minutes", "ten"], "--minutes 'ten': give a number of minutes"),
    (["--bogus"], "unknown argument '--bogus'"),
    (["--data", "/nonexistent/cifar.tar.gz"], "--data /nonexistent/cifar.tar.gz: no such file or folder"),
])
def test_bad_arguments(args, message, tmp_path):
    r = gpu_sh(*args, "--out", tmp_path / "o", timeout=60)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()
