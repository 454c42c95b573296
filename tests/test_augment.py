"""Batched augmentations: shapes, ranges, reproducibility, what each one does, bad specs."""
import math

import pytest
import torch

from fastablate.data.augment import KINDS, augment, check_strengths, parse_augment
from fastablate.errors import FastablateError


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.rand(12, 3, 32, 32)


@pytest.mark.parametrize("name", list(KINDS))
def test_each_keeps_shape_and_range_and_reproduces(x, name, device):
    x = x.to(device)
    augs = check_strengths([(name, None)], 32)
    a = augment(x, augs, torch.Generator().manual_seed(1))
    b = augment(x, augs, torch.Generator().manual_seed(1))
    c = augment(x, augs, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.device == x.device and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 + 1e-6
    if name != "center-crop":  # the only deterministic one
        assert not torch.equal(a, c)


def test_what_each_does(x):
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, [("flip", 1.0)], g), x.flip(3))
    assert torch.allclose(augment(x, [("rotation", 0.0)], g), x, atol=1e-5)
    assert torch.allclose(augment(x, [("color-jitter", 0.0)], g), x, atol=1e-6)
    assert torch.allclose(augment(x, [("center-crop", 32.0)], g), x, atol=1e-6)
    cut = augment(x, [("cutout", 8.0)], g)
    zeroed = (cut == 0).all(1).flatten(1).sum(1)
    assert (zeroed <= 64).all() and (zeroed >= 16).all()  # an 8x8 square, cut by the border at worst to 4x4
    sp = augment(torch.full((64, 3, 32, 32), 0.5), [("salt-pepper", 0.1)], g)
    changed = (sp != 0.5).any(1).float().mean().item()
    assert abs(changed - 0.1) < 0.01 and set(sp.unique().tolist()) == {0.0, 0.5, 1.0}
    noisy = augment(torch.full((64, 3, 32, 32), 0.5), [("gaussian", 0.05)], g)
    assert abs((noisy - 0.5).std().item() - 0.05) < 0.002
    blurred = augment(x, [("blur", 2.0)], g)
    assert abs(blurred.mean().item() - x.mean().item()) < 0.01 and blurred.std() < x.std()
    shifted = augment(x, [("crop", 4.0)], g)
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    assert all(any(torch.equal(shifted[i], xp[i, :, dy:dy + 32, dx:dx + 32]) for dy in range(9) for dx in range(9))
               for i in range(12))


def test_parse_and_bad_specs():
    assert parse_augment("crop,rotation:15,gaussian:0.1") == (("crop", None), ("rotation", 15.0), ("gaussian", 0.1))
    for text, message in (("crop,zoom", "unknown augmentation 'zoom'"), ("blur:x", "strength 'x'"),
                          ("rotation:nan", "not finite")):
        with pytest.raises(ValueError, match=message):
            parse_augment(text)
    for augs, message in (([("cutout", 40.0)], "cutout:40: the strength (px side) must be in (0, 32]"),
                          ([("flip", 1.5)], "flip:1.5"), ([("resized-crop", 0.0)], "resized-crop:0"),
                          ([("blur", 20.0)], "blur:20")):
        with pytest.raises(FastablateError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            check_strengths(augs, 32)
    assert check_strengths([("crop", None), ("center-crop", None)], 32) == [("crop", 4.0), ("center-crop", 28.0)]
    assert math.isclose(check_strengths([("gaussian", None)], 32)[0][1], 0.05)
