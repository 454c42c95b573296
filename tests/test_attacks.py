"""Attacks: budgets verified, early stop, targeted, the CLI and its outputs."""
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_near_oracle, float64

from fastablate.cli import cli
from fastablate.data import batches, build_dataset
from fastablate.engines.core.runtime import Runtime
from fastablate import attacks
from fastablate.attacks import margin, random_search, set_pixels
from fastablate.attacks.sparse_rs import rs_replaced
from fastablate.engines.studies.attacks import AttackSpec, run_attack
from fastablate.errors import FastablateError
from fastablate.models import build_model
from fastablate.models.checkpoint import load_model
from fastablate.modes import inference_copy

RT = Runtime()


@pytest.fixture(scope="module")
def model(trained_resnet8):
    return load_model(trained_resnet8).eval()


@pytest.fixture(scope="module")
def ds():
    return build_dataset("synthetic", None, "test", limit=40)


class Branchy(torch.nn.Module):
    """A model fx cannot trace: its path depends on the values of its input."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 10)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if h.mean() > 0:
            h = h.relu()
        return self.head(h.mean((2, 3)))


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["resnet8", "preresnet20", "vgg11_bn", "branchy"])
def test_inference_copy_is_the_same_function(name):
    torch.manual_seed(0)
    model = Branchy() if name == "branchy" else build_model(name, 10)
    for m in model.modules():  # statistics far from the identity, so folding them is checked
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = inference_copy(model)
    assert model.training and all(p.requires_grad for p in model.parameters())  # the model is as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in copy.parameters())
    if name in ("resnet8", "vgg11_bn"):  # folded: every BatchNorm follows a convolution (pre-activation: none)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in copy.modules())
    model.eval()
    x = torch.rand(6, 3, 32, 32)

    def logits_and_gradient(net, x):
        x = x.clone().requires_grad_()
        out = net(x)
        return out.detach(), torch.autograd.grad(out[:, 3].sum(), x)[0]
    # The eager model is the reference path, the copy the fast one; both judged by float64.
    (want, g_want), (got, g_got) = logits_and_gradient(model, x), logits_and_gradient(copy, x)
    exact, g_exact = logits_and_gradient(float64(model), float64(x))
    assert_near_oracle(got, want, exact, msg=f"{name} logits")
    assert_near_oracle(g_got, g_want, g_exact, msg=f"{name} input gradient")


def test_margin():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    y = torch.tensor([0, 1])
    assert margin(logits, y, None).tolist() == [-1.0, -4.0]
    assert margin(logits, y, torch.tensor([2, 2])).tolist() == [-1.0, -4.0]


@pytest.mark.parametrize("k", [1, 5, 20])
def test_sparse_attack_stays_within_k_pixels_and_range(model, ds, k):
    x, y = next(batches(ds, 40))
    out = attacks.sparse(model, x, y, k=k, steps=5, restarts=2, queries=20)
    adv, steps, queries = out.x_adv, out.steps, out.queries
    changed = (adv != x).any(1).flatten(1).sum(1)
    assert changed.max() <= k and adv.min() >= 0 and adv.max() <= 1
    assert (steps >= 1).all() and (steps <= 10).all() and (queries <= 20).all()
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    assert torch.equal(adv[~fooled], x[~fooled])  # a failure returns the original
    assert torch.equal(out.success, fooled) and torch.equal(out.l0, changed)


@pytest.mark.parametrize("k", [1, 5])
def test_sparse_rs_is_black_box_within_budget_and_seeded(model, ds, k):
    x, y = next(batches(ds, 40))
    x.requires_grad_(False)
    with torch.autograd.set_grad_enabled(False):  # forward passes only: no gradient is ever taken
        out = attacks.sparse_rs(model, x, y, k=k, queries=50, generator=torch.Generator().manual_seed(3))
    adv, steps, queries = out.x_adv, out.steps, out.queries
    assert (adv != x).any(1).flatten(1).sum(1).max() <= k and adv.min() >= 0 and adv.max() <= 1
    assert not steps.any() and (queries >= 1).all() and (queries <= 50).all()
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    assert (queries[~fooled] == 50).all()  # only a fooled image stops early
    again = attacks.sparse_rs(model, x, y, k=k, queries=50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(adv, again.x_adv)


def _correct(model, ds):
    x, y = next(batches(ds, 40))
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok], y[ok]


def test_sparse_ensemble_starts_with_sparse(model, ds):
    x, y = _correct(model, ds)
    out = attacks.sparse_ensemble(model, x, y, k=2, steps=3, queries=40, generator=torch.Generator().manual_seed(5))
    adv, steps, queries, who = out.x_adv, out.steps, out.queries, out.fooled_by
    # The same seed: the first attack is sparse with the ensemble's gradient options and its own finish.
    first = attacks.sparse(model, x, y, k=2, steps=3, generator=torch.Generator().manual_seed(5))
    alone, alone_steps = first.x_adv, first.steps
    with torch.no_grad():
        fooled, fooled_alone = (model(a).argmax(1) != y for a in (adv, alone))
    assert fooled_alone.any() and torch.equal(who == 0, fooled_alone) and torch.equal(steps, alone_steps)
    assert torch.equal(fooled, who >= 0) and (fooled | ~fooled_alone).all()  # robust: the minimum over both
    assert (queries[~fooled] == 300 + 40).all()  # sparse's finish, then sparse-rs's 40 queries
    assert ((adv != x).any(1).flatten(1).sum(1) <= 2).all() and torch.equal(adv[~fooled], x[~fooled])


def test_an_ensemble_runs_its_next_attack_on_what_the_first_leaves(model, ds):
    """With a first attack that fools nothing, the ensemble is its second attack on every image."""
    from functools import partial

    from fastablate.attacks.base import output

    def nothing(model, x, y, *, target=None, generator=None):
        return output(x, x.clone(), torch.zeros(len(x), dtype=torch.bool), torch.zeros(len(x), dtype=torch.long))
    x, y = _correct(model, ds)
    out = attacks.ensemble(model, x, y, attacks=[nothing, partial(attacks.sparse_rs, k=5, queries=60)],
                           generator=torch.Generator().manual_seed(2))
    adv, queries, who = out.x_adv, out.queries, out.fooled_by
    rs = attacks.sparse_rs(model, x, y, k=5, queries=60, generator=torch.Generator().manual_seed(2))
    alone, alone_queries = rs.x_adv, rs.queries
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    assert fooled.any() and torch.equal(who == 1, fooled) and not (who == 0).any()
    assert torch.equal(adv, alone) and torch.equal(queries, alone_queries)


def test_random_search_keeps_what_it_fooled_and_sets_pixels(model, ds):
    x, y = next(batches(ds, 40))
    with torch.no_grad():  # the same start (one query), then only changes that keep the margin
        start, _, _ = random_search(model, x, y, 2, 1, None, torch.Generator().manual_seed(0))
        after, fooled, used = random_search(model, x, y, 2, 30, None, torch.Generator().manual_seed(0))
        fooled0, fooled1 = (margin(model(a), y, None) > 0 for a in (start, after))
    assert (fooled1 >= fooled0).all() and (used[fooled0] == 1).all() and torch.equal(fooled, fooled1)
    assert torch.equal(after[~fooled1], x[~fooled1]) and ((after != x).any(1).flatten(1).sum(1) <= 2).all()
    pix = torch.tensor([[0, 5]])
    out = set_pixels(torch.zeros(1, 3, 2, 3), pix, torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]]))
    assert out[0, :, 0, 0].tolist() == [1, 0, 1] and out[0, :, 1, 2].tolist() == [0, 1, 1] and out.sum() == 4


@pytest.mark.parametrize("queries, k, replaced", [
    (10_000, 100, {0: 15, 49: 15, 50: 7, 199: 7, 200: 6, 999: 5, 1999: 3, 3999: 3, 5999: 2, 7999: 2, 9998: 1}),
    (300, 5, {i: 1 for i in range(299)}),  # k = 5: one pixel from the first trial on
    # rescaled to the budget; at i = 99, 0.3 / 6 * 40 is 1.999... in floats: 1, as the reference has it
    (1000, 40, {0: 6, 4: 6, 5: 3, 19: 3, 20: 2, 99: 1}),
    (20_000, 10, {0: 3, 1: 1}),  # past 10,000 queries, the first trial keeps the initial share
])
def test_replaced_pixels_follow_sparse_rs_schedule(queries, k, replaced):
    """Sparse-RS's rule: iteration it = i + 1 rescaled to 10,000 queries, the share 0.3 divided
    by the schedule's divisor, times k, rounded down, at least 1."""
    assert {i: rs_replaced(i, queries, k) for i in replaced} == replaced


def test_random_search_finish_fools_more(model, ds):
    rates = [run_attack(model, ds, AttackSpec(k=1, steps=3, queries=q), RT).success_rate for q in (0, 200)]
    assert rates[1] >= rates[0] and rates[1] > 0


def test_more_pixels_fool_more(model, ds):
    rates = [run_attack(model, ds, AttackSpec(k=k, steps=10, restarts=2), RT).success_rate for k in (1, 40)]
    assert rates[1] > rates[0] and rates[1] > 0.3


@pytest.mark.parametrize("attack", ["noise", "fgsm", "pgd", "pgd-l2"])
def test_dense_attacks(model, ds, attack):
    kw = {"noise": dict(steps=10), "fgsm": dict(eps=8 / 255), "pgd": dict(steps=10, eps=8 / 255, step=0.05),
          "pgd-l2": dict(steps=10, eps=0.5, step=0.05)}[attack]
    spec = AttackSpec(attack=attack, **kw)
    res = run_attack(model, ds, spec, RT, keep=True)
    ex = res.examples
    assert 0 <= res.success_rate <= 1 and res.attacked == round(res.clean_accuracy * 40)
    assert res.robust_accuracy == pytest.approx(res.clean_accuracy * (1 - res.success_rate))
    d = ex["x_adv"] - ex["x"]
    assert ex["x_adv"].min() >= 0 and ex["x_adv"].max() <= 1
    if attack in ("fgsm", "pgd"):
        assert d.abs().max() <= 8 / 255 + 1e-6
    if attack == "pgd-l2":
        assert d.flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert not d[~ex["success"]].any()  # only fooled images are changed
    assert torch.equal(ex["pred_adv"][ex["success"]] != ex["y"][ex["success"]],
                       torch.ones(int(ex["success"].sum()), dtype=torch.bool))


def test_noise_attack_reports_norm_and_stops_early(model, ds):
    res = run_attack(model, ds, AttackSpec(attack="noise", steps=200, lr=0.05, lam=0.01), RT, keep=True)
    ex = res.examples
    assert res.success_rate > 0.5 and res.mean_l2 > 0 and res.steps_mean < 200
    fooled = ex["success"]
    norms = (ex["x_adv"] - ex["x"])[fooled].flatten(1).norm(dim=1)
    assert res.mean_l2 == pytest.approx(norms.mean().item(), rel=1e-5)


def test_targeted(model, ds):
    res = run_attack(model, ds, AttackSpec(attack="pgd", steps=20, eps=0.3, step=0.05, target=3), RT, keep=True)
    ex = res.examples
    ok = ex["success"]
    assert ok.any() and (ex["pred_adv"][ok] == 3).all()
    assert not ex["attacked"][ex["y"] == 3].any() and res.skipped_target_class == int(
        ((ex["y"] == 3) & (ex["pred_adv"] == 3)).sum())


def test_target_equal_to_label_is_an_error(model, ds):
    x, y = next(batches(ds, 4))
    with pytest.raises(FastablateError, match=f"target class {int(y[1])} equals the label of image 1"):
        attacks.sparse(model, x, y, k=2, target=torch.where(torch.arange(4) == 1, y, (y + 1) % 10))


@pytest.mark.parametrize("attack, queries", [("sparse-rs", 1), ("sparse-rs", 7), ("sparse", 7)])
def test_queries_mean_counts_what_the_budget_counts(attack, queries, trained_resnet8, tmp_path):
    """Forward passes of the random search per attacked image: never above --queries."""
    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["attack", "--weights", str(trained_resnet8), "--dataset", "synthetic", "--limit", "30",
                                 "--attack", attack, "--k", "1", "--queries", str(queries), "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["attacked"] > 0 and 0 <= res["queries_mean"] <= queries
    if attack == "sparse-rs":  # every attacked image makes at least its first query
        assert res["queries_mean"] >= 1


def test_cli_sparse_ensemble_names_each_attacks_share(trained_resnet8, tmp_path):
    out = tmp_path / "e"
    r = CliRunner().invoke(cli, ["attack", "--weights", str(trained_resnet8), "--dataset", "synthetic", "--limit", "30",
                                 "--attack", "sparse-ensemble", "--k", "1", "--steps", "3", "--queries", "20",
                                 "--save-examples", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    parts = res["parts"]
    assert list(parts) == ["sparse", "sparse-rs"] and res["attacked"] > 0
    assert sum(p["fooled"] for p in parts.values()) == round(res["success_rate"] * res["attacked"])
    assert sum(p["share"] for p in parts.values()) == pytest.approx(res["success_rate"])
    assert res["spec"]["queries"] == 20 and res["spec"]["steps"] == 3 and res["k"] == 1
    assert "fooled by: sparse " in r.output and ", then sparse-rs " in r.output
    adv = torch.load(out / "adversarial.pt", weights_only=True)
    assert int(adv["success"].sum()) == sum(p["fooled"] for p in parts.values())
    r = CliRunner().invoke(cli, ["attack", "--weights", str(trained_resnet8), "--dataset", "synthetic", "--limit", "30",
                                 "--attack", "sparse-rs", "--k", "1", "--queries", "2", "--out", str(tmp_path / "rs")])
    assert r.exit_code == 0 and "parts" not in json.loads((tmp_path / "rs" / "results.json").read_text())


def test_cli_attack_outputs(trained_resnet8, tmp_path):
    out, data = tmp_path / "run", tmp_path / "adv.pt"
    r = CliRunner().invoke(cli, ["attack", "--weights", str(trained_resnet8), "--dataset", "synthetic", "--limit", "30",
                                 "--pixels", "0.005", "--steps", "5", "--restarts", "2", "--save-examples",
                                 "--save-dataset", str(data), "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    for key in ("success_rate", "robust_accuracy", "clean_accuracy", "attacked", "median_l0", "mean_l2", "steps_mean",
                "seconds_per_image"):
        assert key in res
    assert res["k"] == 5 and (res["median_l0"] is None or res["median_l0"] <= 5) and res["queries_mean"] >= 0
    adv = torch.load(out / "adversarial.pt", weights_only=True)
    assert set(adv) >= {"x", "x_adv", "y", "pred_adv"} and adv["x"].shape == (30, 3, 32, 32)
    assert ((adv["x_adv"] != adv["x"]).any(1).flatten(1).sum(1) <= 5).all()
    assert (out / "plots" / "examples.png").stat().st_size > 500
    saved = torch.load(data, weights_only=True)  # the successful examples only, with their source
    won = adv["success"].nonzero().squeeze(1)
    assert saved["format"] == "fastablate-adversarial-set" and saved["version"] == 2
    assert saved["images"].dtype == torch.uint8 and saved["images"].shape == (len(won), 3, 32, 32)
    assert torch.equal(saved["index"], adv["index"][won]) and torch.equal(saved["labels"], adv["y"][won])
    assert torch.equal(saved["images"], adv["x_adv"][won].mul(255).round().to(torch.uint8))


def test_successes_attack_until_n_are_fooled_in_a_random_order(trained_resnet8, tmp_path):
    base = ["attack", "--weights", str(trained_resnet8), "--dataset", "synthetic", "--split", "train",
            "--attack", "pgd", "--eps", "0.1", "--steps", "3"]
    r = CliRunner().invoke(cli, [*base, "--successes", "25", "--save-dataset", str(tmp_path / "a.pt"),
                                 "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    assert len(saved["labels"]) == 25 and len(saved["index"].unique()) == 25
    assert len(saved["labels"].unique()) >= 5  # a random order: not the first classes of the split
    ds = build_dataset("synthetic", None, "train")
    assert torch.equal(ds.labels[saved["index"]], saved["labels"])  # indices into the split
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["images"] < len(ds) and res["success_rate"] * res["attacked"] >= 25  # stopped early
    r = CliRunner().invoke(cli, [*base, "--limit", "30", "--successes", "30", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0 and "the split ran out after" in r.stderr  # not every image is fooled
    r = CliRunner().invoke(cli, [*base, "--limit", "30", "--successes", "31", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "--successes 31: the split holds 30 images" in r.stderr
    assert not (tmp_path / "c").exists()


ATTACK_BAD = [
    (["--pixels", "0.0001"], "--pixels 0.0001 rounds to 0 pixels of 32x32 images"),
    (["--k", "2000"], "--k 2000: sparse attack: k = 2000 pixels is not in 1..1024"),
    (["--pixels", "1.5"], "--pixels '1.5': must be in (0, 1]"),
    (["--pixels", "0.01", "--k", "3"], "--pixels and --k both set the pixel budget"),
    (["--attack", "onepixel"],
     "--attack 'onepixel': is not one of: sparse, sparse-rs, sparse-ensemble, noise, fgsm, pgd, pgd-l2"),
    (["--attack", "pgd", "--queries", "10"],
     "--queries does not apply to --attack pgd (it is for sparse, sparse-rs, sparse-ensemble)"),
    (["--attack", "sparse-ensemble", "--queries", "0"],
     "--queries 0: the random search of sparse-ensemble needs at least 1 query"),
    (["--attack", "sparse-ensemble", "--eps", "0.1"], "--eps does not apply to --attack sparse-ensemble"),
    (["--attack", "sparse-rs", "--queries", "-1"], "--queries '-1': must be in [0, 10000000]"),
    (["--attack", "sparse-rs", "--steps", "3"], "--steps does not apply to --attack sparse-rs"),
    (["--target", "10"], "--target 10 is not a class of synthetic (0..9)"),
    (["--target", "-1"], "--target '-1': must be >= 0"),
    (["--target", "0", "--limit", "1"], "--target 0 equals the label of every image: nothing to attack"),
    (["--steps", "0"], "--steps '0': must be in [1, 1000000]"),
    (["--attack", "pgd", "--eps", "-1"], "--eps '-1': must be in (0, 1e+06]"),
    (["--attack", "noise", "--lam", "nan"], "--lam 'nan': is not a finite number"),
    (["--save-dataset", "{tmp}/d.pt", "--compare", "{weights}"], "--save-dataset writes one model's adversarial set"),
    (["--save-dataset", "{weights}"], "--save-dataset {weights} is the --weights input; choose another file"),
    (["--attack", "pgd", "--restarts", "3"],
     "--restarts does not apply to --attack pgd (it is for sparse, sparse-ensemble)"),
    (["--attack", "fgsm", "--steps", "3"], "--steps does not apply to --attack fgsm"),
    (["--lam", "0.1"], "--lam does not apply to --attack sparse (it is for noise)"),
]


@pytest.mark.parametrize("args, message", ATTACK_BAD, ids=[m[:30] for _, m in ATTACK_BAD])
def test_cli_bad_attack_input(args, message, trained_resnet8, tmp_path):
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path, weights=trained_resnet8) for a in args]
    r = CliRunner().invoke(cli, ["attack", "--weights", str(trained_resnet8), "--dataset", "synthetic", "--limit", "20",
                                 *args, "--out", str(out)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    message = message.format(tmp=tmp_path, weights=trained_resnet8)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("attack", ["noise", "pgd", *(pytest.param(a, marks=pytest.mark.slow)
                                                   for a in ("sparse", "sparse-rs", "sparse-ensemble"))])
def test_save_trajectory_records_the_attack_update_by_update(attack, trained_resnet8, tmp_path):
    out = tmp_path / attack
    r = CliRunner().invoke(cli, ["attack", "--weights", str(trained_resnet8), "--dataset", "synthetic", "--limit", "30",
                                 "--attack", attack, "--save-trajectory", "--out", str(out)])
    assert r.exit_code == 0, r.output
    t = torch.load(out / "trajectory.pt", weights_only=True)
    frames, pred = t["frames"], t["pred"]
    assert frames.shape[1:] == (4, 3, 32, 32) and frames.shape[0] >= 3 and pred.shape == frames.shape[:2]
    ds = build_dataset("synthetic", None, "test", limit=30)
    assert torch.allclose(frames[0], ds.floats(t["index"]))  # the originals first
    assert (pred[0] == t["y"]).all()  # correctly classified ones
    moved = (frames[1:] != frames[0]).flatten(2).any(2)
    assert moved.any()  # the attack changed them on the way
    if attack.startswith("sparse"):  # every recorded candidate within the pixel budget
        assert ((frames - frames[0]).abs().amax(2).flatten(2) > 0).sum(2).max() <= 5
    assert (out / "plots" / "trajectory.png").stat().st_size > 5000
