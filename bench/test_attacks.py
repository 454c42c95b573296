"""Sparse-pixel attacks at a budget of 5 pixels (all channels) on a trained CIFAR-10 model:
fastablate's sparse attack against torchattacks 3.5.1's OnePixel, Pixle, JSMA and SparseFool
on the same correctly classified images: the defaults (30 steps, no restart) and 20 steps
with 4 restarts. An example counts as a success only when it fools
the model, differs from its original in at most 5 pixels and stays in [0, 1].

Needs: pip install torchattacks==3.5.1; FASTABLATE_BENCH_WEIGHTS=<a CIFAR-10 checkpoint>;
the CIFAR-10 test set at $FASTABLATE_BENCH_CIFAR (default ~/data/cifar10-jpg). Skips otherwise.

Run: python -m pytest bench/test_attacks.py --benchmark-only --benchmark-json=attacks.json
"""
import os
import time
from pathlib import Path

import pytest
import torch

from fastablate.data import batches, build_dataset
from fastablate.engines.attacks import AttackSpec, sparse_attack
from fastablate.models.checkpoint import load_model

K = 5
IMAGES = int(os.environ.get("FASTABLATE_BENCH_IMAGES", 100))


def _peer(name, model):
    ta = pytest.importorskip("torchattacks")
    h, w = 32, 32
    return {"onepixel": lambda: ta.OnePixel(model, pixels=K, steps=10, popsize=10),
            "pixle": lambda: ta.Pixle(model, x_dimensions=(1, K), y_dimensions=(1, 1), restarts=20, max_iterations=10),
            "jsma": lambda: ta.JSMA(model, theta=1.0, gamma=K * 3 / (3 * h * w)),
            "sparsefool": lambda: ta.SparseFool(model, steps=10, lam=3, overshoot=0.02)}[name]()


@pytest.fixture(scope="module")
def setup():
    weights = os.environ.get("FASTABLATE_BENCH_WEIGHTS")
    root = Path(os.environ.get("FASTABLATE_BENCH_CIFAR", Path.home() / "data" / "cifar10-jpg"))
    if not weights or not Path(weights).is_file() or not (root / "test").is_dir():
        pytest.skip("set FASTABLATE_BENCH_WEIGHTS to a CIFAR-10 checkpoint and have the CIFAR-10 test set")
    model = load_model(weights).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ds = build_dataset("imagefolder", str(root), "test", limit=IMAGES)
    x, y = next(batches(ds, len(ds)))
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return model, x[ok], y[ok], len(ds)


OURS = {"fastablate": AttackSpec(k=K, steps=30, restarts=1),  # the CLI's defaults
        "fastablate-4restarts": AttackSpec(k=K, steps=20, restarts=4)}


@pytest.mark.parametrize("impl", [*OURS, "onepixel", "pixle", "jsma", "sparsefool"])
def test_sparse_attacks_5_pixels(benchmark, setup, impl):
    model, x, y, n = setup
    benchmark.group = f"sparse attack {K} pixels cifar10 ({x.shape[0]} of {n} images correctly classified)"
    torch.manual_seed(0)
    if impl in OURS:
        def attack():
            return sparse_attack(model, x, y, OURS[impl], generator=torch.Generator().manual_seed(0))[0]
    else:
        peer = _peer(impl, model)

        def attack():
            return peer(x, y)
    start = time.perf_counter()
    adv = benchmark.pedantic(attack, rounds=1, iterations=1)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    l0 = (adv != x).any(1).flatten(1).sum(1)
    within = fooled & (l0 <= K) & (adv.amin((1, 2, 3)) >= 0) & (adv.amax((1, 2, 3)) <= 1)
    benchmark.extra_info.update(success_rate=round(within.float().mean().item(), 4),
                                fooled_any_budget=round(fooled.float().mean().item(), 4),
                                seconds_per_image=round(seconds / x.shape[0], 4), attacked=int(x.shape[0]))
