"""Sparse-pixel attacks at budgets of k = 1, 5, 10 and 24 pixels (all channels) on a trained
CIFAR-10 model: fastablate's white-box sparse attack (the default: 30 gradient steps, then
a 300-query random search for the images left; and gradient steps alone), its black-box
sparse-rs (1,000 queries), and torchattacks 3.5.1's OnePixel, Pixle, JSMA and SparseFool on
the same correctly classified images. An example counts as a success only when it fools the
model, differs from its original in at most k pixels and stays in [0, 1].

``test_success_against_queries`` records the success of sparse-rs and of the default's
random-search finish (run to 10,000 queries) within each number of queries (one run each,
read off the queries each fooled image needed) and draws it into
$FASTABLATE_BENCH_PLOTS/attacks-queries.png.

Needs: pip install torchattacks==3.5.1; FASTABLATE_BENCH_WEIGHTS=<a CIFAR-10 checkpoint>;
the CIFAR-10 test set at $FASTABLATE_BENCH_CIFAR (default ~/data/cifar10-jpg). Skips otherwise.

Run: python -m pytest bench/test_attacks.py --benchmark-only --benchmark-json=attacks.json
"""
import os
import time
from pathlib import Path

import pytest
import torch

from fastablate.engines.core.attack_options import AttackOptions

BUDGETS = (1, 5, 10, 24)


def _peer(name, model, k):
    ta = pytest.importorskip("torchattacks")
    h, w = 32, 32
    return {"onepixel": lambda: ta.OnePixel(model, pixels=k, steps=10, popsize=10),
            "pixle": lambda: ta.Pixle(model, x_dimensions=(1, k), y_dimensions=(1, 1), restarts=20, max_iterations=10),
            "jsma": lambda: ta.JSMA(model, theta=1.0, gamma=k * 3 / (3 * h * w)),
            "sparsefool": lambda: ta.SparseFool(model, steps=10, lam=3, overshoot=0.02)}[name]()


OURS = {"fastablate": dict(attack="sparse"),  # the CLI's defaults
        "fastablate-gradient-only": dict(attack="sparse", queries=0),
        "fastablate-sparse-rs": dict(attack="sparse-rs")}


def _ours(model, x, y, impl, k, **changes):
    spec = AttackOptions(k=k, **{**OURS[impl], **changes}).resolved(x.shape[-1])
    out = spec.run(model, x, y, None, torch.Generator().manual_seed(0))
    return out.x_adv, out.steps, out.queries


def _verified(model, x, y, adv, k):
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    l0 = (adv != x).any(1).flatten(1).sum(1)
    return fooled, fooled & (l0 <= k) & (adv.amin((1, 2, 3)) >= 0) & (adv.amax((1, 2, 3)) <= 1)


@pytest.mark.parametrize("k", BUDGETS)
@pytest.mark.parametrize("impl", [*OURS, "onepixel", "pixle", "jsma", "sparsefool"])
def test_sparse_attacks(benchmark, cifar_attack, impl, k):
    model, x, y, n = cifar_attack
    if impl == "sparsefool" and k != BUDGETS[0]:
        pytest.skip("SparseFool takes no budget: one run, scored at every k by the report")
    benchmark.group = f"sparse attack {k} pixels cifar10 ({x.shape[0]} of {n} images correctly classified)"
    torch.manual_seed(0)
    if impl in OURS:
        def attack():
            return _ours(model, x, y, impl, k)[0]
    else:
        peer = _peer(impl, model, k)

        def attack():
            return peer(x, y)
    start = time.perf_counter()
    adv = benchmark.pedantic(attack, rounds=1, iterations=1)
    seconds = time.perf_counter() - start
    fooled, within = _verified(model, x, y, adv, k)
    info = dict(success_rate=round(within.float().mean().item(), 4), fooled_any_budget=round(fooled.float().mean()
                                                                                               .item(), 4),
                seconds_per_image=round(seconds / x.shape[0], 4), attacked=int(x.shape[0]))
    if impl == "sparsefool":
        l0 = (adv != x).any(1).flatten(1).sum(1)
        info["success_at"] = {b: round((fooled & (l0 <= b)).float().mean().item(), 4) for b in BUDGETS}
    benchmark.extra_info.update(info)


def test_success_against_queries(cifar_attack):
    """Success within q queries for sparse-rs (1,000) and the default's finish run to 10,000
    queries (its default budget is 300), k = 5."""
    model, x, y, _ = cifar_attack
    curves = {}
    for impl, budget in (("fastablate-sparse-rs", 1000), ("fastablate", 10_000)):
        adv, steps, queries = _ours(model, x, y, impl, 5, queries=budget)
        _, within = _verified(model, x, y, adv, 5)
        grid = [q for q in (0, 1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000, 10_000) if q <= budget]
        curves[impl] = (grid, [((queries <= q) & within).float().mean().item() for q in grid])
    out = os.environ.get("FASTABLATE_BENCH_PLOTS")
    if out:
        from fastablate.plots import pyplot, save

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        labels = {"fastablate-sparse-rs": "sparse-rs (black-box)",
                  "fastablate": "sparse: 30 gradient steps, then random search (default: 300)"}
        for impl, (grid, rates) in curves.items():
            ax.plot([max(q, 0.5) for q in grid], rates, "o-", label=labels[impl])
        ax.set(xscale="log", xlabel="queries (forward passes) per image, 0 plotted at 0.5", ylabel="success rate",
               title=f"k = 5 pixels, {x.shape[0]} CIFAR-10 images", ylim=(0, 1))
        ax.legend(fontsize=8)
        save(fig, Path(out) / "attacks-queries.png")
    print({impl: dict(zip(*c)) for impl, c in curves.items()})
