"""Noise injection overhead: resnet56 forward on 128 CIFAR-sized images, clean vs. with
Gaussian noise on the outputs of 3 random conv layers or of all 55, through the hooks of
fastablate.engines.noise (the kernel, in place) or through the eager formula
``out + sigma * torch.randn_like(out)``.

Run: python -m pytest bench/test_noise.py --benchmark-only --benchmark-json=noise.json
"""
import pytest
import torch

from conftest import timed
from fastablate.engines.noise import NoiseInjector, stream_seed
from fastablate.models import build_model


def eager_op(x, sigma, *, seed, offset, inplace):
    return x.add_(sigma * torch.randn_like(x))


IMPLS = {"clean": None, "fastablate n=3": (3, None), "fastablate all": (55, None), "eager all": (55, eager_op)}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_noise_injection_resnet56(benchmark, device, impl):
    torch.manual_seed(0)
    model = build_model("resnet56").eval().to(device)
    x = torch.rand(128, 3, 32, 32, device=device)
    injector = NoiseInjector(model) if IMPLS[impl] is None or IMPLS[impl][1] is None else \
        NoiseInjector(model, IMPLS[impl][1])
    assert len(injector.layers) == 55
    if IMPLS[impl] is not None:
        n = IMPLS[impl][0]
        layers = torch.randperm(55)[:n].tolist()
        injector.active = {i: (0.5, stream_seed(0, 0, i)) for i in layers}
    benchmark.group = f"noise injection resnet56 {device.type} 128x3x32x32"

    def forward():
        with torch.no_grad():
            return model(x)
    timed(benchmark, forward, device=device)
    injector.remove()
