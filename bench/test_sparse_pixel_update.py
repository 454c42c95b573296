"""sparse_pixel_update vs. the eager topk/gather/scatter step, torch.compile of it, and the reference.

Run: python -m pytest bench/test_sparse_pixel_update.py --benchmark-only --benchmark-columns=median,iqr,rounds
"""
import pytest
import torch
from conftest import timed

from fastablate import _ext
from fastablate.ops import reference as ref
from fastablate.ops import sparse_pixel_update

# (N, C, H, W), with k = 0.5% of the pixels (5 of 32x32, 250 of 224x224)
SIZES = [(8, 3, 32, 32), (256, 3, 32, 32), (32, 3, 224, 224)]
STEP = 0.1


def eager(x, g, k):
    n, c, h, w = x.shape
    idx = g.abs().sum(1).view(n, -1).topk(k, dim=1).indices
    gi = idx[:, None, :].expand(n, c, k)
    out = x.reshape(n, c, h * w).clone()
    v = (out.gather(2, gi) + STEP * g.reshape(n, c, h * w).gather(2, gi).sign()).clamp(0, 1)
    return out.scatter_(2, gi, v).view(n, c, h, w), idx


def fastablate(x, g, k):
    return sparse_pixel_update(x, g, k, STEP)


_bounds = {}


def reference_impl(x, g, k):
    if "b" not in _bounds:
        _bounds["b"] = (torch.zeros(x.shape[1], dtype=torch.float64, device=x.device),
                        torch.ones(x.shape[1], dtype=torch.float64, device=x.device))
    lo, hi = _bounds["b"]
    return ref.sparse_pixel_update(x, g, k, STEP, lo=lo, hi=hi)


_compiled = {}


def compiled(x, g, k):
    if "f" not in _compiled:
        _compiled["f"] = torch.compile(eager, dynamic=False)
    return _compiled["f"](x, g, k)


IMPLS = {"eager": eager, "compile": compiled, "reference": reference_impl, "fastablate": fastablate}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_sparse_pixel_update(benchmark, device, shape, impl):
    if impl == "fastablate" and not _ext.has_kernel(device, "sparse_pixel_update"):
        pytest.skip("no compiled kernel")
    benchmark.group = f"sparse_pixel_update {device.type} {'x'.join(map(str, shape))}"
    x, g = torch.rand(shape, device=device), torch.randn(shape, device=device)
    k = max(1, round(0.005 * shape[2] * shape[3]))
    _compiled.clear()
    _bounds.clear()
    timed(benchmark, IMPLS[impl], x, g, k, device=device)
