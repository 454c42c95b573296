"""Path gradients: fastablate's computation (one forward pass for the unit sets of a pass, their
gradients stacked in one backward pass through only the branches each set takes) against the
per-sample loop that builds each masked network explicitly, on the same images.

Run: python -m pytest bench/test_paths.py --benchmark-only --benchmark-columns=median,iqr,rounds
"""
import random

import pytest
import torch

from fastablate.engines.paths import naive_gradients, shared_gradients
from fastablate.models import build_model
from fastablate.units import units

CASES = [("resnet56", 32, 8), ("resnet20", 32, 8), ("resnet56", 16, 16)]  # model, samples, images per sample


@pytest.mark.parametrize("impl", ["naive", "fastablate"])
@pytest.mark.parametrize("name, samples, images", CASES, ids=[f"{m}-{s}x{i}" for m, s, i in CASES])
def test_path_gradients(benchmark, name, samples, images, impl):
    torch.manual_seed(0)
    model = build_model(name).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    view = units(model)
    n = len(view.units)
    rng = random.Random(0)
    sets = [frozenset(rng.sample(range(n), rng.randint(1, n))) for _ in range(samples)]
    x = torch.rand(images, 3, 32, 32)
    y = torch.randint(0, 10, (images,))
    benchmark.group = f"paths cpu {name} {samples} samples x {images} images"
    fn = shared_gradients if impl == "fastablate" else naive_gradients
    fn(view, x, y, sets[:2])  # warm-up
    benchmark.pedantic(fn, args=(view, x, y, sets), rounds=3, iterations=1)
