"""Path gradients: fastablate's computation (one forward pass for the unit sets of a pass, their
gradients stacked in one backward pass through only the branches each set takes, eval-mode
BatchNorm as its affine map) against the per-sample loop that builds each masked network
explicitly, on the same images.

Run: python -m pytest bench/test_paths.py --benchmark-only --benchmark-columns=median,iqr,rounds
"""
import importlib.util
import random
from contextlib import nullcontext

import pytest
import torch

from fastablate.engines.studies.paths import naive_gradients, shared_gradients
from fastablate.models import build_model
from fastablate.modes import affine_batchnorm
from fastablate.units import units

# model, unit sets per pass, images per set; the first three at the paths defaults (--sets 64 --images 8)
# ViT-Tiny (timm, patch 4: 65 tokens): 24 discovered units, attention and MLP of each block.
VIT_TINY = "timm:vit_tiny_patch16_224,patch_size=4"
CASES = [("resnet20", 64, 8), ("resnet56", 64, 8), ("resnet110", 64, 8), ("resnet56", 16, 8), ("resnet56", 16, 16)] + \
    ([(VIT_TINY, 64, 8)] if importlib.util.find_spec("timm") else [])


@pytest.mark.parametrize("impl", ["naive", "fastablate"])
@pytest.mark.parametrize("name, samples, images", CASES,
                         ids=[f"{'vit-tiny' if m == VIT_TINY else m}-{s}x{i}" for m, s, i in CASES])
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
    with affine_batchnorm(model) if impl == "fastablate" else nullcontext():  # as the paths study runs it
        fn(view, x, y, sets[:2])  # warm-up
        benchmark.pedantic(fn, args=(view, x, y, sets), rounds=5, iterations=1)
