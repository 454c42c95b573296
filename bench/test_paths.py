"""Path gradients: the stacked computation (many unit sets per pass, block_skip backward
masks) against the per-sample loop that builds each masked network explicitly.

Run: python -m pytest bench/test_paths.py --benchmark-only --benchmark-columns=median,iqr,rounds
"""
import random

import pytest
import torch

from fastablate.engines.paths import naive_gradients, stacked_gradients
from fastablate.models import build_model
from fastablate.units import units

CASES = [("resnet56", 32, 8), ("resnet20", 32, 8), ("resnet56", 16, 16)]  # model, samples, images per sample


@pytest.mark.parametrize("impl", ["naive", "stacked"])
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
    x = torch.rand(samples, images, 3, 32, 32)
    y = torch.randint(0, 10, (samples, images))
    benchmark.group = f"paths cpu {name} {samples} samples x {images} images"
    fn = stacked_gradients if impl == "stacked" else naive_gradients
    fn(view, x[:2], y[:2], sets[:2])  # warm-up
    benchmark.pedantic(fn, args=(view, x, y, sets), rounds=3, iterations=1)
