"""``--attack sparse-rs`` and ``--attack sparse`` against the authors' Sparse-RS (Croce et al.
2022, the reference code in ../shared/peers/sparse-rs) on the same correctly classified
CIFAR-10 images, model and seed, at k = 5 pixels: success and seconds per attacked image at
100, 300 and 1,000 queries (10,000 with FASTABLATE_BENCH_LONG=1), untargeted, and targeted at
1,000 (and 10,000) queries towards class (label + 1) mod 10; ``--attack sparse-ensemble`` at
the largest budget. An example counts as a success only when it fools the model, differs from
its original in at most k pixels and stays in [0, 1]. Seeds: $FASTABLATE_BENCH_SEEDS (default
0), each run with every implementation.

Needs FASTABLATE_BENCH_WEIGHTS (a CIFAR-10 checkpoint), the CIFAR-10 test set at
$FASTABLATE_BENCH_CIFAR (default ~/data/cifar10-jpg) and the reference at
$FASTABLATE_BENCH_SPARSE_RS (default ../shared/peers/sparse-rs beside the repository). Skips otherwise.

Run: python -m pytest bench/test_sparse_rs.py --benchmark-only --benchmark-json=sparse-rs.json
Plot: python bench/test_sparse_rs.py bench/sparse-rs.png sparse-rs.json [more.json ...]   (success
against queries from the untargeted runs at the largest budget, and against seconds per image;
a run in a later file replaces the same run in an earlier one)
"""
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from fastablate.engines.core.attack_options import AttackOptions
from fastablate.modes import inference_copy

K = 5
LONG = bool(os.environ.get("FASTABLATE_BENCH_LONG"))
QUERIES = (100, 300, 1000) + ((10_000,) if LONG else ())
TARGETED = (1000,) + ((10_000,) if LONG else ())
SEEDS = tuple(int(s) for s in os.environ.get("FASTABLATE_BENCH_SEEDS", "0").split(","))
GRID = (1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000, 10_000)  # queries of the success curves
PEER = Path(os.environ.get("FASTABLATE_BENCH_SPARSE_RS", Path(__file__).resolve().parents[2] / "shared" / "peers"
                           / "sparse-rs"))


def _reference(model, x, y, queries, target, seed):
    if not (PEER / "rs_attacks.py").is_file():
        pytest.skip(f"the reference Sparse-RS is not at {PEER}")
    sys.path.insert(0, str(PEER))
    try:
        from rs_attacks import RSAttack
    finally:
        sys.path.remove(str(PEER))
    atk = RSAttack(lambda z: model(z), norm="L0", eps=K, n_queries=queries, p_init=0.3, n_restarts=1, seed=seed,
                   verbose=False, targeted=target is not None, loss="margin" if target is None else "ce",
                   device="cpu", log_path=None)
    with torch.no_grad():
        used, adv = atk.perturb(x, y if target is None else target)
    return adv, used.long()  # used: the queries of each fooled image (0 for the others)


def _ours(model, x, y, queries, target, seed, attack="sparse-rs", copy=True):
    """The attack as ``fastablate attack`` runs it: on an inference copy of the model (made
    within the timing)."""
    spec = AttackOptions(attack=attack, k=K, queries=queries).resolved(x.shape[-1])
    on = inference_copy(model) if copy else model
    out = spec.run(on, x, y, target, torch.Generator().manual_seed(seed))
    return out.x_adv, out.queries


IMPLS = {"reference": _reference, "fastablate": _ours,
         # Where the time goes: the reference given the inference copy, ours given the model.
         "reference-on-copy": lambda model, *a: _reference(inference_copy(model), *a),
         "fastablate-on-model": lambda *a: _ours(*a, copy=False),
         "fastablate-sparse": lambda *a: _ours(*a, attack="sparse"),
         "fastablate-ensemble": lambda *a: _ours(*a, attack="sparse-ensemble")}


def _fooled(model, x, y, adv, target):
    """Per image: fooled, within k pixels and [0, 1]."""
    with torch.no_grad():
        pred = model(adv).argmax(1)
    fooled = pred != y if target is None else pred == target
    l0 = (adv != x).any(1).flatten(1).sum(1)
    return fooled & (l0 <= K) & (adv.amin((1, 2, 3)) >= 0) & (adv.amax((1, 2, 3)) <= 1)


def _run(benchmark, cifar_attack, impl, queries, target_of, seed):
    model, x, y, n = cifar_attack
    target = None if target_of is None else target_of(y)
    start = time.perf_counter()
    adv, used = benchmark.pedantic(IMPLS[impl], args=(model, x, y, queries, target, seed), rounds=1, iterations=1)
    seconds = time.perf_counter() - start
    won = _fooled(model, x, y, adv, target)
    benchmark.extra_info.update(success_rate=round(won.float().mean().item(), 4), queries=queries, seed=seed,
                                seconds_per_image=round(seconds / x.shape[0], 4), attacked=int(x.shape[0]))
    if impl in ("reference", "fastablate"):  # the random search's queries of each fooled image
        benchmark.extra_info["success_within"] = {q: round((won & (used <= q)).float().mean().item(), 4)
                                                  for q in GRID if q <= queries}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("impl", ["reference", "fastablate", "fastablate-sparse", "reference-on-copy",
                                  "fastablate-on-model"])
@pytest.mark.parametrize("queries", QUERIES)
def test_untargeted(benchmark, cifar_attack, impl, queries, seed):
    if impl in ("reference-on-copy", "fastablate-on-model") and (queries > 1000 or seed != SEEDS[0]):
        pytest.skip("where the time goes: measured at up to 1,000 queries, the first seed")
    benchmark.group = f"sparse-rs k={K} untargeted {queries} queries seed {seed} ({cifar_attack[1].shape[0]} images)"
    _run(benchmark, cifar_attack, impl, queries, None, seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_ensemble(benchmark, cifar_attack, seed):
    """sparse-ensemble with the largest budget for its sparse-rs: its success against the
    untargeted runs of the same budget (the robust accuracy is 1 - success on these images)."""
    benchmark.group = f"sparse-ensemble k={K} {QUERIES[-1]} queries seed {seed} ({cifar_attack[1].shape[0]} images)"
    _run(benchmark, cifar_attack, "fastablate-ensemble", QUERIES[-1], None, seed)


@pytest.mark.parametrize("impl", ["reference", "fastablate"])
@pytest.mark.parametrize("queries", TARGETED)
def test_targeted(benchmark, cifar_attack, impl, queries):
    benchmark.group = f"sparse-rs k={K} targeted {queries} queries ({cifar_attack[1].shape[0]} images)"
    _run(benchmark, cifar_attack, impl, queries, lambda y: (y + 1) % 10, SEEDS[0])


class Timed(torch.nn.Module):
    """The model, with the wall time of its forward passes summed."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seconds, self.calls = model, 0.0, 0

    def forward(self, x):
        start = time.perf_counter()
        out = self.model(x)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


@pytest.mark.parametrize("impl", ["reference", "fastablate"])
def test_time_outside_the_forward_pass(benchmark, cifar_attack, impl):
    """The share of an attack's time spent outside the model's forward passes (candidate
    sampling, the pixel write, the margin, acceptance, bookkeeping), 1,000 queries; each on
    the model it runs on (ours: the inference copy)."""
    model, x, y, _ = cifar_attack
    timed = Timed(model if impl == "reference" else inference_copy(model))
    fn = _reference if impl == "reference" else lambda *a: _ours(*a, copy=False)
    benchmark.group = f"sparse-rs k={K} 1000 queries: time outside the forward pass"
    start = time.perf_counter()
    benchmark.pedantic(fn, args=(timed, x, y, 1000, None, SEEDS[0]), rounds=1, iterations=1)
    total = time.perf_counter() - start
    benchmark.extra_info.update(outside_share=round(1 - timed.seconds / total, 4), forward_s=round(timed.seconds, 3),
                                total_s=round(total, 3), forward_calls=timed.calls)


def plot(out: str, *paths: str) -> None:
    """Success against queries (the untargeted runs at the largest budget, per seed) and
    against seconds per image (every untargeted run) from benchmark JSON files."""
    import json

    from fastablate.plots import pyplot, save

    named = {b["name"]: b for path in paths for b in json.load(open(path))["benchmarks"]}
    runs = [b for name, b in named.items() if name.startswith(("test_untargeted", "test_ensemble"))]
    top = max(b["extra_info"]["queries"] for b in runs)
    names = {"reference": "reference Sparse-RS", "fastablate": "sparse-rs", "fastablate-sparse": "sparse (white-box)",
             "fastablate-ensemble": "sparse-ensemble"}
    colours = {"reference": "tab:gray", "fastablate": "tab:blue", "fastablate-sparse": "tab:orange",
               "fastablate-ensemble": "tab:green"}
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4))
    for b in runs:
        impl, info = b["params"].get("impl", "fastablate-ensemble"), b["extra_info"]
        if "success_within" in info and info["queries"] == top:
            grid = sorted(info["success_within"], key=int)
            left.plot([int(q) for q in grid], [info["success_within"][q] for q in grid], "-", color=colours[impl],
                      label=f"{names[impl]}, seed {info['seed']}")
    for impl in names:
        points = sorted((b["extra_info"]["seconds_per_image"], b["extra_info"]["success_rate"]) for b in runs
                        if b["params"].get("impl", "fastablate-ensemble") == impl)
        if points:
            right.plot(*zip(*points), "o", color=colours[impl], label=names[impl])
    left.set(xscale="log", xlabel="queries per image", ylabel="success rate", ylim=(0, 1),
             title=f"k = {K}: success within q queries ({top}-query runs)")
    right.set(xscale="log", xlabel="seconds per attacked image", ylabel="success rate", ylim=(0, 1),
              title="success against time (every budget and seed)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, Path(out))


if __name__ == "__main__":
    plot(*sys.argv[1:])
