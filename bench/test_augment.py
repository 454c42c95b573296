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
    "all ten": "crop,flip,rotation:15,color-jitter:0.4,resized-crop:0.6,center-crop:28,cutout:8,blur:1,"
               "salt-pepper:0.02,gaussian:0.05",
}


def _torchvision(spec: str):
    from torchvision.transforms import v2

    steps = {"crop": v2.RandomCrop(32, padding=4), "flip": v2.RandomHorizontalFlip(),
             "rotation": v2.RandomRotation(15), "color-jitter": v2.ColorJitter(0.4, 0.4, 0.4),
             "resized-crop": v2.RandomResizedCrop(32, scale=(0.6, 1.0), antialias=True),
             "center-crop": v2.Compose([v2.CenterCrop(28), v2.Resize(32, antialias=True)]),
             "cutout": v2.RandomErasing(p=1.0, scale=(64 / 1024, 64 / 1024), ratio=(1, 1)),
             "blur": v2.GaussianBlur(7, sigma=(0.1, 1.0)),
             "salt-pepper": None, "gaussian": v2.GaussianNoise(sigma=0.05, clip=True)}
    names = [n for n, _ in parse_augment(spec)]
    t = v2.Compose([steps[n] for n in names if steps[n] is not None])
    return lambda x: torch.stack([t(img) for img in x])  # one image at a time, as a Dataset does


def _kornia(spec: str):
    import kornia.augmentation as K

    steps = {"crop": K.RandomCrop((32, 32), padding=4), "flip": K.RandomHorizontalFlip(),
             "rotation": K.RandomRotation(15.0), "color-jitter": K.ColorJitter(0.4, 0.4, 0.4, p=1.0),
             "resized-crop": K.RandomResizedCrop((32, 32), scale=(0.6, 1.0)),
             "center-crop": K.CenterCrop(28), "cutout": K.RandomErasing(scale=(64 / 1024, 64 / 1024), ratio=(1, 1),
                                                                         p=1.0),
             "blur": K.RandomGaussianBlur((7, 7), (0.1, 1.0), p=1.0), "salt-pepper": None,
             "gaussian": K.RandomGaussianNoise(std=0.05, p=1.0)}
    names = [n for n, _ in parse_augment(spec)]
    seq = K.AugmentationSequential(*[steps[n] for n in names if steps[n] is not None])
    resize = "center-crop" in names
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
