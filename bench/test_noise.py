"""Noise injection overhead: resnet56 forward on 128 CIFAR-sized images, clean vs. with
Gaussian noise on the outputs of 3 random conv layers or of all 55, through the hooks of
fastablate.engines.studies.noise (the kernel, in place) or through the eager formula
``out + sigma * torch.randn_like(out)``. One model and one input serve every row, so the
rows differ only in what the hooks do.

Run: python -m pytest bench/test_noise.py --benchmark-only --benchmark-min-rounds=20 --benchmark-json=noise.json
"""
import pytest
import torch
from conftest import timed

from fastablate.engines.studies.noise import NoiseInjector, stream_seed
from fastablate.models import build_model


def eager_op(x, sigma, *, seed, offset, inplace):
    return x.add_(sigma * torch.randn_like(x))


# "clean (again)" repeats the baseline last: the first row of a session runs measurably slower here.
LAYERS = {"clean": 0, "fastablate n=3": 3, "fastablate all": 55, "eager all": 55, "clean (again)": 0}


@pytest.fixture(scope="module")
def resnet56(device):
    torch.manual_seed(0)
    return build_model("resnet56").eval().to(device), torch.rand(128, 3, 32, 32, device=device)


@pytest.mark.parametrize("impl", list(LAYERS))
def test_noise_injection_resnet56(benchmark, device, resnet56, impl):
    model, x = resnet56
    injector = NoiseInjector(model, eager_op) if impl.startswith("eager") else NoiseInjector(model)
    assert len(injector.layers) == 55
    chosen = torch.randperm(55, generator=torch.Generator().manual_seed(0))[:LAYERS[impl]].tolist()
    injector.active = {i: (0.5, stream_seed(0, 0, i)) for i in chosen}
    benchmark.group = f"noise injection resnet56 {device.type} 128x3x32x32"

    def forward():
        with torch.no_grad():
            return model(x)
    try:
        timed(benchmark, forward, device=device)
    finally:
        injector.remove()
