"""Lesion studies: plans, the prefix-sharing executor against the naive loop, the CLI."""
import importlib.util
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import assert_same_predictions, decided, float64, oracle_bound, randomize_bn
from torch import nn

from fastablate.cli import cli
from fastablate.data import build_dataset
from fastablate.engines.core.runtime import Runtime
from fastablate.engines.studies.lesion import (LesionExecutor, build_variants, kendall_tau, naive_logits, run_lesion,
                                               swappable_groups)
from fastablate.errors import FastablateError
from fastablate.models import NormalizedModel, build_model, load_model, save_checkpoint
from fastablate.units import units

MODEL_FILES = Path(__file__).parent / "models"
DEEP = ("resnet110", "preresnet164", "vgg19")  # the slow tier's: the deepest


def _models():
    yield "resnet20", build_model("resnet20"), ["all-single", "k-random", "reorder", "units:layer1.1,layer3.2"]
    yield "plain20", build_model("plain20"), ["all-single", "k-random", "reorder", "units:layer2.1"]
    yield "resnet18", build_model("resnet18"), ["all-single", "k-random", "reorder"]
    tv = NormalizedModel(torchvision.models.resnet18(num_classes=10), (0.5,) * 3, (0.25,) * 3)
    yield "torchvision-resnet18", tv, ["all-single", "k-random", "reorder", "units:layer4.1"]
    yield "vgg11", build_model("vgg11"), ["all-single", "k-random"]
    yield "vgg19", build_model("vgg19"), ["all-single", "k-random"]
    yield "resnet110", build_model("resnet110"), ["all-single", "reorder"]
    yield "preresnet20", build_model("preresnet20"), ["all-single", "k-random", "reorder"]
    yield "preresnet164", build_model("preresnet164"), ["all-single", "reorder"]
    yield "preplain20", build_model("preplain20"), ["all-single", "k-random"]
    yield "resnet20-stochastic-depth", build_model("resnet20", stochastic_depth=0.5), ["all-single", "k-random"]
    # units discovered in the traced graph: a user's file, a ViT (two units per block)
    yield "file-resnet20", build_model(f"{MODEL_FILES}/cifar_resnet_lambda.py:resnet20"), ["all-single", "k-random",
                                                                                           "reorder"]
    if importlib.util.find_spec("timm"):
        yield "timm-vit", build_model("timm:vit_tiny_patch16_224,patch_size=8,depth=2,embed_dim=48,num_heads=2"), \
            ["all-single", "k-random", "reorder"]


@pytest.mark.numerics
@pytest.mark.parametrize("name, model, plans", [pytest.param(*m, marks=pytest.mark.slow) if m[0] in DEEP else m
                                               for m in _models()], ids=lambda v: v if isinstance(v, str) else "")
def test_executor_equals_naive_loop(name, model, plans, device):
    model = randomize_bn(model).to(device)
    view = units(model)
    variants = build_variants(view, plans, samples=3, seed=1)
    x = torch.rand(3, 3, 32, 32, device=device)
    ref = naive_logits(view, variants, x)
    exact = naive_logits(units(float64(model)), variants, float64(x))
    # One chunk, stacked, stacked up to a byte limit, or one segment per variant group; one
    # variant per chunk.
    for max_memory, stack_rows, stack_bytes in ((1 << 40, 256, 1 << 40), (1 << 40, 256, 150_000),
                                                (1 << 40, 0, 1 << 40), (1, 256, 1 << 40)):
        ex = LesionExecutor(view, [v.steps for v in variants], batch_size=3, max_memory=max_memory,
                            stack_rows=stack_rows, stack_bytes=stack_bytes)
        slot = {s: i for i, s in enumerate(ex.unique)}
        got = ex(x)[[slot[v.steps] for v in variants]]
        # Stacked rows run at other batch sizes than the naive loop's: judged by float64.
        assert_same_predictions(got, ref, exact, msg=f"{name} {max_memory} {stack_rows} {stack_bytes}")
    assert len(LesionExecutor(view, [v.steps for v in variants], batch_size=3, max_memory=1).chunks) == len(ex.unique)


def test_all_single_shares_prefixes():
    view = units(build_model("resnet56"))
    variants = build_variants(view, ["all-single"])
    ex = LesionExecutor(view, [v.steps for v in variants], batch_size=128, max_memory=1 << 40)
    n = len(view.units)  # 27, all lesionable
    assert len(variants) == n + 1 and len(ex.chunks) == 1
    # The intact stream runs n steps; the variant deleting unit i (0-based) adds its own n - i,
    # one of them the cheap lesioned step: n + n(n+1)/2 in all, against (n+1)n for the naive loop.
    assert ex.unit_evaluations() == n + n * (n + 1) // 2
    assert ex.unit_evaluations() / ((n + 1) * n) < 0.54


def test_memory_budget_splits_into_chunks():
    view = units(build_model("resnet20"))
    steps = [v.steps for v in build_variants(view, ["all-single"])]
    one = LesionExecutor(view, steps, batch_size=64, max_memory=1 << 40)
    budget = one.peak_bytes // 3
    split = LesionExecutor(view, steps, batch_size=64, max_memory=budget)
    assert len(split.chunks) > 1 and split.peak_bytes <= budget
    assert sorted(i for c in split.chunks for i in c) == list(range(len(one.unique)))


def test_plans():
    view = units(build_model("resnet20"))
    names = view.names()
    single = build_variants(view, ["all-single"])
    assert single[0].plan == "intact" and all(s[1] for s in single[0].steps)
    assert [v.deleted for v in single[1:]] == [(n,) for n in names]
    kr = build_variants(view, ["k-random"], ks=[1, 2, 9], samples=5, seed=3)[1:]
    by_k = {k: [v.deleted for v in kr if len(v.deleted) == k] for k in (1, 2, 9)}
    assert len(by_k[1]) == 5 and len(set(by_k[1])) == 5  # C(9,1) = 9 > 5: 5 distinct random sets
    assert len(by_k[2]) == 5 and len(set(by_k[2])) == 5 and by_k[9] == [tuple(names)]
    assert build_variants(view, ["k-random"], ks=[2], samples=5, seed=3) == \
        build_variants(view, ["k-random"], ks=[2], samples=5, seed=3)
    assert build_variants(view, ["k-random"], ks=[2], samples=5, seed=3) != \
        build_variants(view, ["k-random"], ks=[2], samples=5, seed=4)
    explicit = build_variants(view, ["units:layer3.2,layer1.0"])[1]
    assert explicit.deleted == ("layer1.0", "layer3.2") and explicit.plan == "units"


def test_k_random_takes_all_sets_when_few():
    view = units(build_model("resnet20"))
    kr = build_variants(view, ["k-random"], ks=[1, 8], samples=20)[1:]
    assert len(kr) == 9 + 9 and len({v.steps for v in kr}) == 18


def test_reorder_swaps_same_shape_units_only():
    view = units(build_model("resnet20"))
    groups = swappable_groups(view)
    assert [[view.units[i].name for i in g] for g in groups] == [
        ["layer1.0", "layer1.1", "layer1.2"], ["layer2.1", "layer2.2"], ["layer3.1", "layer3.2"]]
    orders = build_variants(view, ["reorder"], samples=12, seed=0)[1:]
    assert len({v.order for v in orders}) == 12
    for v in orders:
        perm = [j for j, _ in v.steps]
        assert sorted(perm) == list(range(9)) and perm != list(range(9))
        for pos, j in enumerate(perm):
            if pos == j:
                continue
            assert view.units[pos].in_shape == view.units[j].in_shape == view.units[j].out_shape
        assert v.tau == pytest.approx(kendall_tau(perm)) and -1 <= v.tau < 1
    assert min(v.tau for v in orders) < max(v.tau for v in orders)


def test_kendall_tau():
    assert kendall_tau([0, 1, 2, 3]) == 1 and kendall_tau([3, 2, 1, 0]) == -1
    for perm in itertools.permutations(range(5)):
        c = sum(1 for i, j in itertools.combinations(range(5), 2) if perm[i] < perm[j])
        assert kendall_tau(perm) == pytest.approx((2 * c - 10) / 10)


@pytest.mark.parametrize("plans, kw, message", [
    (["units:layer9.9"], {}, "resnet20-test has no unit 'layer9.9'; units are: layer1.0"),
    (["k-random"], {"ks": [10]}, "--k 10: resnet20-test has 9 lesionable units, so k must be in 1..9"),
    (["bogus"], {}, "--lesion 'bogus': is not a plan; choose from: all-single, k-random, reorder"),
])
def test_bad_plans(plans, kw, message):
    with pytest.raises(FastablateError, match=message.replace(".", r"\.")):
        build_variants(units(build_model("resnet20")), plans, model_name="resnet20-test", **kw)
    with pytest.raises(FastablateError, match="unit layer2.0 of plain20 is not lesionable: plain unit changes shape"):
        build_variants(units(build_model("plain20")), ["units:layer2.0"], model_name="plain20")


@pytest.mark.numerics
def test_run_lesion_metrics_match_naive_logits(trained_resnet8):
    """Per-variant accuracies equal float64's on every image whose margin float32's error bound
    cannot close, on a trained model and real-sized batches; losses and confidences within
    float32's tolerance of float64's (DESIGN.md, Numerics)."""
    model = load_model(trained_resnet8).eval()
    ds = build_dataset("synthetic", None, "test", limit=128)
    view = units(model)
    variants = build_variants(view, ["all-single", "k-random"], ks=[1, 2], samples=3)
    res = run_lesion(model, ds, variants, Runtime(batch_size=64), view=view, max_memory=1 << 30)
    x = ds.load(torch.arange(len(ds))).float() / 255
    y = ds.labels
    logits = naive_logits(view, variants, x)
    exact = naive_logits(units(float64(model)), variants, float64(x))
    accuracies = set()
    for v, row in zip(variants, [res.intact] + res.variants):
        i = variants.index(v)
        sure = decided(exact[i], oracle_bound(logits[i], exact[i]))
        correct = exact[i].argmax(1) == y
        assert sure.float().mean() > 0.9, v.deleted  # the check below decides most images
        # Decided images count as float64 counts them; an undecided one may go either way.
        assert (correct & sure).sum() <= round(row["accuracy"] * len(y)) <= (correct | ~sure).sum(), v.deleted
        assert row["loss"] == pytest.approx(nn.functional.cross_entropy(exact[i], y).item(), rel=1e-5)
        assert row["mean_confidence"] == pytest.approx(exact[i].softmax(1).max(1).values.mean().item(), rel=1e-5)
        accuracies.add(row["accuracy"])
    assert len(accuracies) > 3  # the variants differ: the comparison is not between constants
    assert res.variants[0]["delta"] == pytest.approx(res.variants[0]["accuracy"] - res.intact["accuracy"])
    assert res.unit_evaluations < res.naive_unit_evaluations


# --- the CLI ---------------------------------------------------------------------------------
def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("lesion")
    torch.manual_seed(0)
    for name in ("resnet20", "plain20"):
        save_checkpoint(randomize_bn(build_model(name)), d / f"{name}.pt")
    return d


DATA = ["--dataset", "synthetic", "--limit", "40", "--batch-size", "20", "--device", "cpu"]


def test_cli_lesion_study_with_compare(checkpoints, tmp_path):
    out = tmp_path / "run"
    r = run("eval", "--weights", checkpoints / "resnet20.pt", *DATA, "--lesion", "all-single", "--lesion", "k-random",
            "--k", "1,3", "--samples", "4", "--lesion", "reorder", "--lesion", "units:layer1.0,layer2.1",
            "--compare", checkpoints / "plain20.pt", "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    clean = run("eval", "--weights", checkpoints / "resnet20.pt", *DATA, "--out", tmp_path / "clean")
    assert res["intact"]["accuracy"] == json.loads((tmp_path / "clean" / "results.json").read_text())["accuracy"]
    plans = [v["plan"] for v in res["variants"]]
    assert plans.count("all-single") == 9 and plans.count("k-random") == 4 + 4 and plans.count("reorder") == 4
    assert plans.count("units") == 1
    assert res["plans"] == ["all-single", "k-random", "reorder", "units:layer1.0,layer2.1"]
    for v in res["variants"]:
        assert set(v) >= {"units", "accuracy", "loss", "mean_confidence", "delta"}
        assert v["delta"] == pytest.approx(v["accuracy"] - res["intact"]["accuracy"])
    assert all("tau" in v for v in res["variants"] if v["plan"] == "reorder")
    other = res["compare"]
    assert other["model"] == "plain20" and [u["unit"] for u in other["unlesionable"]] == ["layer2.0", "layer3.0"]
    assert res["downsampling_units"] == other["downsampling_units"] == ["layer2.0", "layer3.0"]
    assert sum(v["plan"] == "all-single" for v in other["variants"]) == 7
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0] == "model,plan,units,k,tau,accuracy,loss,mean_confidence,delta"
    assert len(rows) == 1 + 1 + len(res["variants"]) + 1 + len(other["variants"])
    for plot in ("lesion-single", "lesion-k-random", "lesion-reorder"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert "not lesionable: layer2.0 (plain unit changes shape" in r.output
    assert "k-random k=3 (4 sets)" in r.output and math.isfinite(res["seconds"])
    assert clean.exit_code == 0


LESION_BAD = [
    (["--lesion", "units:layer9.0"], "--lesion units:layer9.0: resnet20 has no unit 'layer9.0'; units are: layer1.0"),
    (["--lesion", "everything"], "--lesion 'everything': is not a plan; choose from: all-single, k-random"),
    (["--lesion", "units:"], "--lesion 'units:': is not a plan"),
    (["--lesion", "k-random", "--k", "0"], "--k '0': item 0 must be >= 1"),
    (["--lesion", "k-random", "--k", "1,x"], "--k '1,x': item 'x' is not a whole number"),
    (["--lesion", "k-random", "--k", "12"], "--k 12: resnet20 has 9 lesionable units, so k must be in 1..9"),
    (["--lesion", "all-single", "--k", "2"], "--k applies to --lesion k-random, which is not given"),
    (["--lesion", "reorder", "--samples", "0"], "--samples '0': must be in [1, 100000]"),
    (["--lesion", "all-single", "--max-memory", "lots"], "--max-memory 'lots': is not a size such as 2G or 512M"),
    (["--samples", "5"], "--samples applies to the lesion study (--lesion), which is not given"),
    (["--lesion", "units:layer1.0,layer2.0", "--compare", "{ck}/plain20.pt"],
     "--lesion units:layer1.0,layer2.0: unit layer2.0 of plain20 is not lesionable: plain unit changes shape"),
]


@pytest.mark.parametrize("args, message", LESION_BAD, ids=[m[:30] for _, m in LESION_BAD])
def test_cli_bad_lesion_input(args, message, checkpoints, tmp_path):
    out = tmp_path / "out"
    args = [a.format(ck=checkpoints) for a in args]
    r = CliRunner().invoke(cli, ["eval", "--weights", str(checkpoints / "resnet20.pt"), *DATA, *args,
                                 "--out", str(out)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message.format(ck=checkpoints) in lines[0], r.stderr
    assert not out.exists()
