import os
from pathlib import Path

import pytest
import torch

from fastablate.data import batches, build_dataset
from fastablate.models.checkpoint import load_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES, scope="module")
def device(request):
    return torch.device(request.param)


def timed(benchmark, fn, *args, device):
    """Benchmark fn(*args); on CUDA each timed call waits for the device."""
    fn(*args)  # warm-up (and compilation) outside the timing
    if device.type == "cuda":
        def call():
            out = fn(*args)
            torch.cuda.synchronize()
            return out
        torch.cuda.synchronize()
        return benchmark(call)
    return benchmark(fn, *args)


@pytest.fixture(scope="module")
def cifar_attack():
    """(model, x, y, n): the correctly classified images among the first $FASTABLATE_BENCH_IMAGES
    (100) of a seeded class-balanced subset of the CIFAR-10 test set, and the checkpoint
    $FASTABLATE_BENCH_WEIGHTS, for the attack benches; skips without them."""
    weights = os.environ.get("FASTABLATE_BENCH_WEIGHTS")
    root = Path(os.environ.get("FASTABLATE_BENCH_CIFAR", Path.home() / "data" / "cifar10-jpg"))
    if not weights or not Path(weights).is_file() or not (root / "test").is_dir():
        pytest.skip("set FASTABLATE_BENCH_WEIGHTS to a CIFAR-10 checkpoint and have the CIFAR-10 test set")
    model = load_model(weights).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ds = build_dataset("imagefolder", str(root), "test", limit=int(os.environ.get("FASTABLATE_BENCH_IMAGES", 100)))
    x, y = next(batches(ds, len(ds)))
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return model, x[ok], y[ok], len(ds)
