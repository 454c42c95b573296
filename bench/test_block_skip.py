"""block_skip vs. the eager formula, the where-based reference, and torch.compile of it.

Run: python -m pytest bench/test_block_skip.py --benchmark-only --benchmark-columns=median,iqr,rounds
"""
import pytest
import torch
from conftest import timed

from fastablate import _ext
from fastablate.ops import block_skip
from fastablate.ops import reference as ref

SIZES = [(8, 16, 32, 32), (128, 16, 32, 32), (256, 64, 32, 32)]


def eager(s, r, keep):
    return torch.relu(s + keep.view(-1, 1, 1, 1) * r)


def reference_impl(s, r, keep):
    return ref.block_skip(s, r, keep)


def fastablate(s, r, keep):
    return block_skip(s, r, keep)


_compiled = {}


def compiled(s, r, keep):
    if "f" not in _compiled:
        _compiled["f"] = torch.compile(ref.block_skip, dynamic=False)
    return _compiled["f"](s, r, keep)


IMPLS = {"eager": eager, "reference": reference_impl, "fastablate": fastablate, "compile": compiled}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_block_skip(benchmark, device, shape, impl):
    if impl == "fastablate" and not _ext.has_kernel(device, "block_skip"):
        pytest.skip("no compiled kernel")
    benchmark.group = f"block_skip {device.type} {'x'.join(map(str, shape))}"
    s, r = torch.randn(shape, device=device), torch.randn(shape, device=device)
    keep = torch.rand(shape[0], device=device) < 0.5
    timed(benchmark, IMPLS[impl], s, r, keep, device=device)
