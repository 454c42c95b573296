"""gaussian_noise vs. eager x + sigma * randn_like(x), its masked form, torch.compile of both,
and the Philox reference.

Run: python -m pytest bench/test_gaussian_noise.py --benchmark-only --benchmark-columns=median,iqr,rounds
"""
import pytest
import torch
from conftest import timed

from fastablate import _ext
from fastablate.ops import gaussian_noise
from fastablate.ops import reference as ref

SIZES = [(8, 16, 32, 32), (128, 16, 32, 32), (256, 64, 32, 32)]
SIGMA, P = 0.5, 0.5


def eager(x):
    return x + SIGMA * torch.randn_like(x)


def eager_masked(x):
    return x + (torch.rand_like(x) < P) * SIGMA * torch.randn_like(x)


def fastablate(x):
    return gaussian_noise(x, SIGMA, seed=1)


def fastablate_masked(x):
    return gaussian_noise(x, SIGMA, p=P, seed=1)


def reference_impl(x):
    return ref.gaussian_noise(x, SIGMA, seed=1)


_compiled = {}


def _compile(name, fn):
    def run(x):
        if name not in _compiled:
            _compiled[name] = torch.compile(fn, dynamic=False)
        return _compiled[name](x)
    return run


IMPLS = {"eager": eager, "eager-masked": eager_masked, "compile": _compile("c", eager),
         "compile-masked": _compile("cm", eager_masked), "reference": reference_impl,
         "fastablate": fastablate, "fastablate-masked": fastablate_masked}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_gaussian_noise(benchmark, device, shape, impl):
    if impl.startswith("fastablate") and not _ext.has_kernel(device, "gaussian_noise"):
        pytest.skip("no compiled kernel")
    benchmark.group = f"gaussian_noise {device.type} {'x'.join(map(str, shape))}"
    x = torch.randn(shape, device=device)
    timed(benchmark, IMPLS[impl], x, device=device)


@pytest.mark.parametrize("impl", ["copy", "fastablate"])
def test_bandwidth_vs_copy(benchmark, device, impl):
    """On a GPU: the noise kernel against a device-to-device copy of the same tensor."""
    if device.type != "cuda":
        pytest.skip("bandwidth comparison is for CUDA")
    benchmark.group = "gaussian_noise bandwidth cuda 256x64x64x64"
    x = torch.randn(256, 64, 64, 64, device=device)
    fn = (lambda t: t.clone()) if impl == "copy" else fastablate
    timed(benchmark, fn, x, device=device)
