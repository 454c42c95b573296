"""``--attack sparse-rs`` and ``--attack sparse`` against the authors' Sparse-RS (Croce et al.
2022, the reference code in ../shared/peers/sparse-rs) on the same correctly classified
CIFAR-10 images, model and seed, at k = 5 pixels: success and seconds per attacked image at
100, 300 and 1,000 queries (10,000 with FASTABLATE_BENCH_LONG=1), untargeted, and targeted at
1,000 (and 10,000) queries towards class (label + 1) mod 10. An example counts as a success
only when it fools the model, differs from its original in at most k pixels and stays in [0, 1].

Needs FASTABLATE_BENCH_WEIGHTS (a CIFAR-10 checkpoint), the CIFAR-10 test set at
$FASTABLATE_BENCH_CIFAR (default ~/data/cifar10-jpg) and the reference at
$FASTABLATE_BENCH_SPARSE_RS (default ../shared/peers/sparse-rs beside the repository). Skips otherwise.

Run: python -m pytest bench/test_sparse_rs.py --benchmark-only --benchmark-json=sparse-rs.json
"""
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from fastablate.engines.studies.attacks import RUNNERS, AttackSpec

K = 5
LONG = bool(os.environ.get("FASTABLATE_BENCH_LONG"))
QUERIES = (100, 300, 1000) + ((10_000,) if LONG else ())
TARGETED = (1000,) + ((10_000,) if LONG else ())
PEER = Path(os.environ.get("FASTABLATE_BENCH_SPARSE_RS", Path(__file__).resolve().parents[2] / "shared" / "peers"
                           / "sparse-rs"))


def _reference(model, x, y, queries, target):
    if not (PEER / "rs_attacks.py").is_file():
        pytest.skip(f"the reference Sparse-RS is not at {PEER}")
    sys.path.insert(0, str(PEER))
    try:
        from rs_attacks import RSAttack
    finally:
        sys.path.remove(str(PEER))
    atk = RSAttack(lambda z: model(z), norm="L0", eps=K, n_queries=queries, p_init=0.3, n_restarts=1, seed=0,
                   verbose=False, targeted=target is not None, loss="margin" if target is None else "ce",
                   device="cpu", log_path=None)
    with torch.no_grad():
        return atk.perturb(x, y if target is None else target)[1]


def _ours(model, x, y, queries, target, attack="sparse-rs"):
    spec = AttackSpec(attack=attack, k=K, queries=queries)
    return RUNNERS[attack](model, x, y, spec, target, torch.Generator().manual_seed(0))[0]


def _score(model, x, y, adv, target):
    with torch.no_grad():
        pred = model(adv).argmax(1)
    fooled = pred != y if target is None else pred == target
    l0 = (adv != x).any(1).flatten(1).sum(1)
    return (fooled & (l0 <= K) & (adv.amin((1, 2, 3)) >= 0) & (adv.amax((1, 2, 3)) <= 1)).float().mean().item()


def _run(benchmark, cifar_attack, impl, queries, target_of):
    model, x, y, n = cifar_attack
    target = None if target_of is None else target_of(y)
    fn = {"reference": _reference, "fastablate": _ours,
          "fastablate-sparse": lambda *a: _ours(*a, attack="sparse")}[impl]
    start = time.perf_counter()
    adv = benchmark.pedantic(fn, args=(model, x, y, queries, target), rounds=1, iterations=1)
    seconds = time.perf_counter() - start
    benchmark.extra_info.update(success_rate=round(_score(model, x, y, adv, target), 4), queries=queries,
                                seconds_per_image=round(seconds / x.shape[0], 4), attacked=int(x.shape[0]))


@pytest.mark.parametrize("impl", ["reference", "fastablate", "fastablate-sparse"])
@pytest.mark.parametrize("queries", QUERIES)
def test_untargeted(benchmark, cifar_attack, impl, queries):
    benchmark.group = f"sparse-rs k={K} untargeted {queries} queries ({cifar_attack[1].shape[0]} images)"
    _run(benchmark, cifar_attack, impl, queries, None)


@pytest.mark.parametrize("impl", ["reference", "fastablate"])
@pytest.mark.parametrize("queries", TARGETED)
def test_targeted(benchmark, cifar_attack, impl, queries):
    benchmark.group = f"sparse-rs k={K} targeted {queries} queries ({cifar_attack[1].shape[0]} images)"
    _run(benchmark, cifar_attack, impl, queries, lambda y: (y + 1) % 10)


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
    sampling, the pixel write, the margin, acceptance, bookkeeping), 1,000 queries."""
    model, x, y, _ = cifar_attack
    timed = Timed(model)
    fn = _reference if impl == "reference" else _ours
    benchmark.group = f"sparse-rs k={K} 1000 queries: time outside the forward pass"
    start = time.perf_counter()
    benchmark.pedantic(fn, args=(timed, x, y, 1000, None), rounds=1, iterations=1)
    total = time.perf_counter() - start
    benchmark.extra_info.update(outside_share=round(1 - timed.seconds / total, 4), forward_s=round(timed.seconds, 3),
                                total_s=round(total, 3), forward_calls=timed.calls)
