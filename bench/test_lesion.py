"""Lesion all-single: the prefix-sharing executor vs. the naive loop (one lesioned model per
variant, each a plain PyTorch forward over all images), with each run's peak memory.

Images: the CIFAR-10 test set at $FASTABLATE_BENCH_CIFAR (ImageFolder layout, default
~/data/cifar10-jpg) when present, else synthetic 32x32 images; the timing does not depend on
the pixels or on training, so the models keep their seeded initial weights.

Run: python -m pytest bench/test_lesion.py --benchmark-only --benchmark-json=lesion.json
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from fastablate.data import batches, build_dataset
from fastablate.engines.core.runtime import Runtime
from fastablate.engines.studies.lesion import build_variants, run_lesion
from fastablate.models import build_model
from fastablate.units import units

# (model, images): ResNet-56 on 2,000 images; the others on fewer, to keep the naive loop's run short.
# ViT-Tiny (timm, patch 4 on 32x32 images: 65 tokens): 24 discovered units, attention and MLP of each block.
VIT_TINY = "timm:vit_tiny_patch16_224,patch_size=4"
CASES = [("resnet56", 2000), ("resnet20", 500), ("resnet110", 200), ("resnet18", 200)] + \
    ([(VIT_TINY, 200)] if importlib.util.find_spec("timm") else [])
BATCH = 128


def _images(n):
    root = Path(os.environ.get("FASTABLATE_BENCH_CIFAR", Path.home() / "data" / "cifar10-jpg"))
    if (root / "test").is_dir():
        return build_dataset("imagefolder", str(root), "test", limit=n)
    return build_dataset("synthetic", None, "test", limit=n)


def naive(model, view, ds, variants):
    """What one writes without the executor: each variant its own pass over the data."""
    correct = []
    with torch.no_grad():
        for v in variants:
            hits = 0
            for x, y in batches(ds, BATCH):
                hits += (view.forward(x, lesion=v.deleted).argmax(1) == y).sum().item()
            correct.append(hits)
    return correct


def fastablate(model, view, ds, variants):
    return run_lesion(model, ds, variants, Runtime(batch_size=BATCH), view=view)


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM (Linux >= 4.0)
        f.write("5")


def _peak_rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


@pytest.mark.parametrize("impl", ["naive", "fastablate"])
@pytest.mark.parametrize("name, n", CASES, ids=[f"{'vit-tiny' if m == VIT_TINY else m}-{n}" for m, n in CASES])
def test_lesion_all_single(benchmark, name, n, impl):
    torch.manual_seed(0)
    ds = _images(int(os.environ.get("FASTABLATE_BENCH_IMAGES", n)))
    model = build_model(name, ds.num_classes).eval()
    view = units(model)
    variants = build_variants(view, ["all-single"])
    benchmark.group = f"lesion all-single cpu {name} {len(ds)} images {len(variants)} variants"
    fn = {"naive": naive, "fastablate": fastablate}[impl]
    _reset_peak_rss()
    benchmark.pedantic(fn, args=(model, view, ds, variants), rounds=1, iterations=1)
    benchmark.extra_info["peak_rss_mib"] = round(_peak_rss_mib())
