"""Batched augmentations: shapes, ranges, reproducibility, what each one does, bad specs."""
import math

import pytest
import torch

from fastablate.data.augment import KINDS, augment, check_strengths, label, output_size, parse_augment
from fastablate.errors import FastablateError


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.rand(12, 3, 32, 32)


@pytest.mark.parametrize("name", list(KINDS))
def test_each_keeps_shape_and_range_and_reproduces(x, name, device):
    x = x.to(device)
    augs = check_strengths([(name, 48.0 if name == "resize" else None)], 32)
    a = augment(x, augs, torch.Generator().manual_seed(1))
    b = augment(x, augs, torch.Generator().manual_seed(1))
    c = augment(x, augs, torch.Generator().manual_seed(2))
    size = output_size(augs, 32)
    assert size == {"resize": 48, "center-crop": 28}.get(name, 32)
    assert a.shape == (*x.shape[:2], size, size) and a.device == x.device and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 + 1e-6
    if name not in ("center-crop", "resize"):  # the deterministic ones
        assert not torch.equal(a, c)


def test_what_each_does(x):
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, [("flip", 1.0)], g), x.flip(3))
    assert torch.allclose(augment(x, [("rotation", 0.0)], g), x, atol=1e-5)
    assert torch.allclose(augment(x, [("color-jitter", 0.0)], g), x, atol=1e-6)
    assert torch.equal(augment(x, [("center-crop", 24.0)], g), x[:, :, 4:28, 4:28])
    assert torch.equal(augment(x, [("resize", 32.0)], g), x)
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


@pytest.mark.numerics
def test_hue_matches_torchvision(x):
    from torchvision.transforms.v2.functional import adjust_hue

    from fastablate.data.augment import _shift_hue

    for h in (-0.3, 0.1, 0.45):
        ours = _shift_hue(x.clone(), torch.full((x.shape[0],), h))
        assert torch.allclose(ours, adjust_hue(x, h), atol=1e-4)


def test_color_jitter_values_and_probability(x):
    g = torch.Generator().manual_seed(0)
    # brightness only: every image scaled by one factor
    out = augment(x, check_strengths(parse_augment("color-jitter:0.5,0,0,0"), 32), g)
    inside = (out < 1).flatten(1)
    b = [(out.flatten(1)[i][inside[i]] * x.flatten(1)[i][inside[i]]).sum() / x.flatten(1)[i][inside[i]].square().sum()
         for i in range(12)]
    assert all(torch.allclose(out[i], (x[i] * b[i]).clamp(0, 1), atol=1e-5) for i in range(12))
    assert min(b) >= 0.5 and max(b) <= 1.5 and max(b) - min(b) > 0.1
    # blur with @0.5: some images untouched, some blurred
    blurred = augment(x.repeat(8, 1, 1, 1), check_strengths(parse_augment("blur:2@0.5"), 32), g)
    same = (blurred == x.repeat(8, 1, 1, 1)).flatten(1).all(1).float().mean().item()
    assert 0.3 < same < 0.7


def test_parse_and_bad_specs():
    assert parse_augment("crop,rotation:15,gaussian:0.1") == (("crop", None, None), ("rotation", (15.0,), None),
                                                              ("gaussian", (0.1,), None))
    assert parse_augment("color-jitter:0.4,0.3,0.2,0.1@0.8,blur:1.0@0.5,center-crop:24,resize:32") == (
        ("color-jitter", (0.4, 0.3, 0.2, 0.1), 0.8), ("blur", (1.0,), 0.5), ("center-crop", (24.0,), None),
        ("resize", (32.0,), None))
    checked = check_strengths(parse_augment("color-jitter:0.3,blur:1@0.5,center-crop:24,resize:40"), 32)
    assert [label(a) for a in checked] == ["color-jitter:0.3,0.3,0.3,0", "blur:1@0.5", "center-crop:24", "resize:40"]
    assert output_size(checked, 32) == 40
    for text, message in (("crop,zoom", "unknown augmentation 'zoom'"), ("blur:x", "strength 'x'"),
                          ("rotation:nan", "not finite"), ("color-jitter:0.1,0.2", "2 values; it takes 1 or 4"),
                          ("blur:1@2", "probability 2"), ("resize:64@0.5", "changes the image size"),
                          ("rotation:10,20", "2 values; it takes 1")):
        with pytest.raises(ValueError, match=message):
            parse_augment(text)
    for augs, message in (([("cutout", 40.0)], "cutout:40: the strength (px side) must be in (0, 32]"),
                          ([("flip", 1.5)], "flip:1.5"), ([("resized-crop", 0.0)], "resized-crop:0"),
                          ([("blur", 20.0)], "blur:20"), ([("resize", None)], "resize: give its strength"),
                          ([("center-crop", 24.0), ("center-crop", 28.0)], "center-crop:28: the strength (px side) "
                                                                            "must be in (0, 24]")):
        with pytest.raises(FastablateError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            check_strengths(augs, 32)
    assert check_strengths([("crop", None), ("center-crop", None)], 32) == [("crop", 4.0, 1.0),
                                                                            ("center-crop", 28.0, 1.0)]
    assert math.isclose(check_strengths([("gaussian", None)], 32)[0][1], 0.05)
