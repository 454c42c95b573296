"""Batched augmentations (fastablate.data.augment) against torchvision's per-image v2
transforms and kornia's batched ones, on one batch of CIFAR-sized images; and the share of
a resnet20 training step that augmentation takes.

Run: python -m pytest bench/test_augment.py --benchmark-only --benchmark-columns=median,iqr,rounds
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import timed

from fastablate.data.augment import augment, check_strengths, parse_augment

BATCH = 128
PIPELINES = {
    "crop,flip": "crop,flip",
    "all ten": "crop,flip,rotation:15,color-jitter:0.4,resized-crop:0.6,center-crop:28,resize:32,cutout:8,blur:1,"
               "salt-pepper:0.02,gaussian:0.05",
    "hue,blur@p,crop+resize": "color-jitter:0.4,0.4,0.4,0.1,blur:1@0.5,center-crop:28,resize:32",
}


def _torchvision(spec: str):
    from torchvision.transforms import v2

    steps = {"crop": lambda s: v2.RandomCrop(32, padding=4), "flip": lambda s: v2.RandomHorizontalFlip(),
             "rotation": lambda s: v2.RandomRotation(15), "color-jitter": lambda s: v2.ColorJitter(*s),
             "resized-crop": lambda s: v2.RandomResizedCrop(32, scale=(0.6, 1.0), antialias=True),
             "center-crop": lambda s: v2.CenterCrop(28), "resize": lambda s: v2.Resize(32, antialias=True),
             "cutout": lambda s: v2.RandomErasing(p=1.0, scale=(64 / 1024, 64 / 1024), ratio=(1, 1)),
             "blur": lambda s: v2.GaussianBlur(7, sigma=(0.1, 1.0)),
             "salt-pepper": None, "gaussian": lambda s: v2.GaussianNoise(sigma=0.05, clip=True)}
    made = []
    for name, strength, p in check_strengths(parse_augment(spec), 32):
        if steps[name] is not None:
            step = steps[name](strength if isinstance(strength, tuple) else (strength,))
            made.append(v2.RandomApply([step], p=p) if p < 1 else step)
    t = v2.Compose(made)
    return lambda x: torch.stack([t(img) for img in x])  # one image at a time, as a Dataset does


def _kornia(spec: str):
    import kornia.augmentation as K

    steps = {"crop": lambda s, p: K.RandomCrop((32, 32), padding=4), "flip": lambda s, p: K.RandomHorizontalFlip(),
             "rotation": lambda s, p: K.RandomRotation(15.0), "color-jitter": lambda s, p: K.ColorJitter(*s, p=p),
             "resized-crop": lambda s, p: K.RandomResizedCrop((32, 32), scale=(0.6, 1.0)),
             "center-crop": lambda s, p: K.CenterCrop(28), "resize": None,
             "cutout": lambda s, p: K.RandomErasing(scale=(64 / 1024, 64 / 1024), ratio=(1, 1), p=1.0),
             "blur": lambda s, p: K.RandomGaussianBlur((7, 7), (0.1, 1.0), p=p), "salt-pepper": None,
             "gaussian": lambda s, p: K.RandomGaussianNoise(std=0.05, p=1.0)}
    checked = check_strengths(parse_augment(spec), 32)
    seq = K.AugmentationSequential(*[steps[n](s if isinstance(s, tuple) else (s,), p) for n, s, p in checked
                                     if steps[n] is not None])
    resize = any(n == "resize" for n, _, _ in checked)
    return lambda x: F.interpolate(seq(x), size=32, mode="bilinear", antialias=True) if resize else seq(x)


def _fastablate(spec: str):
    augs = check_strengths(parse_augment(spec), 32)
    gen = torch.Generator().manual_seed(0)
    return lambda x: augment(x, augs, gen)


IMPLS = {"fastablate": _fastablate, "torchvision-v2": _torchvision, "kornia": _kornia}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_augment_batch(benchmark, device, pipeline, impl):
    if impl == "kornia":
        pytest.importorskip("kornia")
    if impl == "torchvision-v2" and device.type == "cuda":
        pytest.skip("per-image transforms run in the data loader, on the CPU")
    benchmark.group = f"augment {pipeline} {device.type} {BATCH}x3x32x32"
    x = torch.rand(BATCH, 3, 32, 32, device=device)
    timed(benchmark, IMPLS[impl](PIPELINES[pipeline]), x, device=device)


def test_resnet20_training_step(benchmark, device):
    """The denominator: one SGD step of resnet20 on a batch, channels-last (the train default)."""
    from fastablate.models import build_model

    benchmark.group = f"augment {'crop,flip'} {device.type} {BATCH}x3x32x32 vs a resnet20 step"
    torch.manual_seed(0)
    model = build_model("resnet20").to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.rand(BATCH, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    timed(benchmark, step, device=device)
