"""Batched augmentations: random parameters per image, applied to a whole batch at once on
its device, drawn from a seeded generator (so a run reproduces).

``--augment crop,flip,rotation:15,blur:1.0@0.5`` names them in order, each with an optional
strength and an optional ``@p``: the probability that an image gets it (default 1).

| name | strength (default) | what each image gets |
|---|---|---|
| ``crop`` | padding in px (size/8) | a random crop of the zero-padded image (He et al. 2016) |
| ``flip`` | probability (0.5) | a horizontal flip |
| ``rotation`` | degrees (15) | a rotation by an angle uniform in [-d, d], zeros outside |
| ``color-jitter`` | b,c,s,h (0.4,0.4,0.4,0) | factors uniform in [1-x, 1+x], a hue shift in [-h, h] turns |
| ``resized-crop`` | min area (0.6) | a crop of area [a, 1] and aspect [3/4, 4/3], resized back |
| ``center-crop`` | side in px (7/8 size) | the central square, that size (``resize:S`` after it: back) |
| ``resize`` | side in px (required) | every image resized to that size (bilinear, antialiased) |
| ``cutout`` | side in px (size/4) | a zeroed square at a random place (DeVries & Taylor 2017) |
| ``blur`` | max sigma in px (1.0) | a Gaussian blur of sigma uniform in [0.1, max] |
| ``salt-pepper`` | fraction (0.02) | that fraction of pixels set to black or white, all channels |
| ``gaussian`` | std (0.05) | Gaussian noise of that std (``fastablate.ops.gaussian_noise``), clipped |

``color-jitter:s`` with one value is brightness = contrast = saturation = s and no hue.

Images are float (N, C, H, W) in [0, 1]; every function keeps the range, and all but
``center-crop`` and ``resize`` the shape (:func:`output_size` follows the size through a list;
those two take no ``@p``). The training's evaluation images are resized to that size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastablate.errors import FastablateError

Gen = torch.Generator


def _u(n: int, lo: float, hi: float, gen: Gen | None, device) -> Tensor:
    """n uniforms in [lo, hi], drawn on the CPU generator (the same on every device)."""
    return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(device)


def crop(x: Tensor, pad: float, gen: Gen | None) -> Tensor:
    n, _, h, w = x.shape
    pad = int(pad)
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).to(x.device)
    # Every window of the padded image is a view (N, C, 2p+1, 2p+1, H, W); pick one per image.
    windows = F.pad(x, (pad, pad, pad, pad)).unfold(2, h, 1).unfold(3, w, 1)
    return windows[torch.arange(n, device=x.device), :, shifts[0], shifts[1]]


def flip(x: Tensor, p: float, gen: Gen | None) -> Tensor:
    flipped = _u(x.shape[0], 0, 1, gen, x.device) < p
    return torch.where(flipped[:, None, None, None], x.flip(3), x)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotation(x: Tensor, degrees: float, gen: Gen | None) -> Tensor:
    a = _u(x.shape[0], -degrees, degrees, gen, x.device) * (math.pi / 180)
    cos, sin, zero = a.cos(), a.sin(), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


def _gray(x: Tensor) -> Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None] if x.shape[1] == 3 else x.mean(1, True)


def color_jitter(x: Tensor, s: tuple[float, float, float, float], gen: Gen | None) -> Tensor:
    """Brightness, contrast, saturation, then hue, in that order (torchvision's ColorJitter with
    a fixed order); each image its own factors."""
    n = x.shape[0]
    b, c, sat = (_u(n, max(0.0, 1 - v), 1 + v, gen, x.device).view(n, 1, 1, 1) for v in s[:3])
    hue = _u(n, -s[3], s[3], gen, x.device)
    x = (x * b).clamp_(0, 1)  # a new tensor: the rest works in place
    mean = _gray(x).mean((2, 3), keepdim=True)
    x.sub_(mean).mul_(c).add_(mean).clamp_(0, 1)
    gray = _gray(x)
    x.sub_(gray).mul_(sat).add_(gray).clamp_(0, 1)
    return _shift_hue(x, hue) if s[3] > 0 and x.shape[1] == 3 else x


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """RGB -> HSV, hue + shift (in turns) mod 1, -> RGB, per image (torchvision's formulas)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    v, span = maxc, maxc - minc
    sat = span / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    d = torch.where(span == 0, torch.ones_like(span), span)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(span == 0, torch.zeros_like(h), h)
    h = (h / 6.0 + shift.view(-1, 1, 1)) % 1.0
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - sat), v * (1 - sat * f), v * (1 - sat * (1 - f))
    i = i.long() % 6
    pick = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, (rr, gg, bb) in enumerate(pick):
        m = (i == k)[:, None]
        out = torch.where(m, torch.stack([rr, gg, bb], 1), out)
    return out.clamp_(0, 1)


def resized_crop(x: Tensor, area: float, gen: Gen | None) -> Tensor:
    n = x.shape[0]
    scale = _u(n, area, 1.0, gen, x.device)
    log_ratio = _u(n, math.log(3 / 4), math.log(4 / 3), gen, x.device)
    sw = (scale * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop width / image width
    sh = (scale / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx, cy = (_u(n, -1, 1, gen, x.device) * (1 - sw), _u(n, -1, 1, gen, x.device) * (1 - sh))
    zero = torch.zeros_like(sw)
    theta = torch.stack([torch.stack([sw, zero, cx], 1), torch.stack([zero, sh, cy], 1)], 1)
    return _affine(x, theta)


def center_crop(x: Tensor, side: float, gen: Gen | None) -> Tensor:
    h, w = x.shape[2:]
    top, left = (h - int(side)) // 2, (w - int(side)) // 2
    return x[:, :, top:top + int(side), left:left + int(side)]


def resize(x: Tensor, side: float, gen: Gen | None) -> Tensor:
    from torchvision.transforms.v2.functional import resize as tv_resize

    if x.shape[-2:] == (int(side), int(side)):
        return x
    return tv_resize(x, [int(side), int(side)], antialias=True).clamp_(0, 1)


def cutout(x: Tensor, side: float, gen: Gen | None) -> Tensor:
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=gen).to(x.device)
    cx = torch.randint(0, w, (n,), generator=gen).to(x.device)
    half = int(side) // 2
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    inside = (((rows - cy[:, None]).abs() <= half - (int(side) % 2 == 0))[:, :, None]
              & ((cols - cx[:, None]).abs() <= half - (int(side) % 2 == 0))[:, None, :])
    return x.masked_fill(inside[:, None], 0.0)


def blur(x: Tensor, sigma_max: float, gen: Gen | None) -> Tensor:
    n, c, h, w = x.shape
    sigma = _u(n, min(0.1, sigma_max), sigma_max, gen, x.device)
    radius = max(1, math.ceil(3 * sigma_max))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, taps): one kernel per image and channel
    planes = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    planes = F.conv2d(planes, k[:, None, None, :], groups=n * c)
    planes = F.conv2d(planes, k[:, None, :, None], groups=n * c)
    return planes.view(n, c, h, w)


def salt_pepper(x: Tensor, fraction: float, gen: Gen | None) -> Tensor:
    n, _, h, w = x.shape
    u = torch.rand(n, 1, h, w, generator=gen).to(x.device)
    x = x.masked_fill(u < fraction / 2, 0.0)
    return x.masked_fill((u >= fraction / 2) & (u < fraction), 1.0)


def gaussian(x: Tensor, std: float, gen: Gen | None) -> Tensor:
    from fastablate.ops import gaussian_noise

    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return gaussian_noise(x, std, seed=seed).clamp_(0, 1)


@dataclass(frozen=True)
class Kind:
    fn: Callable[[Tensor, float, Gen | None], Tensor]
    default: Callable[[int], float | None]  # strength from the image size (None: it must be given)
    low: float  # valid strengths: low < s <= high (low itself allowed when low_ok)
    high: Callable[[int], float]
    low_ok: bool = False
    unit: str = ""
    values: int = 1  # strength values it takes (color-jitter: four)
    resizes: bool = False  # the output size is the strength (no @p)


KINDS: dict[str, Kind] = {
    "crop": Kind(crop, lambda s: max(1, s // 8), 0, lambda s: s, True, "px of padding"),
    "flip": Kind(flip, lambda s: 0.5, 0, lambda s: 1, True, "probability"),
    "rotation": Kind(rotation, lambda s: 15.0, 0, lambda s: 180, True, "degrees"),
    "color-jitter": Kind(color_jitter, lambda s: 0.4, 0, lambda s: 1, True, "factor spread", values=4),
    "resized-crop": Kind(resized_crop, lambda s: 0.6, 0, lambda s: 1, False, "min area fraction"),
    "center-crop": Kind(center_crop, lambda s: s * 7 // 8, 0, lambda s: s, False, "px side", resizes=True),
    "resize": Kind(resize, lambda s: None, 7, lambda s: 1024, False, "px side", resizes=True),
    "cutout": Kind(cutout, lambda s: max(1, s // 4), 0, lambda s: s, False, "px side"),
    "blur": Kind(blur, lambda s: 1.0, 0, lambda s: s / 2, False, "px max sigma"),
    "salt-pepper": Kind(salt_pepper, lambda s: 0.02, 0, lambda s: 1, True, "fraction of pixels"),
    "gaussian": Kind(gaussian, lambda s: 0.05, 0, lambda s: 1, True, "std"),
}


Augmentation = tuple  # (name, strength, p): strength a float, or a tuple for color-jitter


def parse_augment(text: str) -> tuple[tuple[str, tuple[float, ...] | None, float | None], ...]:
    """'crop,rotation:15,color-jitter:0.4,0.4,0.4,0.1,blur:1@0.5' -> (('crop', None, None),
    ('rotation', (15.0,), None), ('color-jitter', (0.4, 0.4, 0.4, 0.1), None), ('blur', (1.0,), 0.5)):
    an item that is a number continues the values of the one before. A ValueError names the
    problem."""
    out: list[list] = []
    for item in str(text).split(","):
        item = item.strip()
        body, at, prob = item.partition("@")
        name, colon, strength = body.partition(":")
        if out and not colon and _number(name) and out[-1][2] is None and out[-1][1]:
            out[-1][1].append(_value(out[-1][0], name))  # another value of the item before
            if at:
                out[-1][2] = _probability(out[-1][0], prob)
            continue
        if name not in KINDS:
            raise ValueError(f"has an unknown augmentation {name!r}; choose from: {', '.join(KINDS)}")
        values = [_value(name, strength)] if strength else []
        out.append([name, values, _probability(name, prob) if at else None])
    for name, values, p in out:
        kind = KINDS[name]
        if len(values) > kind.values or (kind.values > 1 and len(values) not in (0, 1, kind.values)):
            raise ValueError(f"gives {name} {len(values)} values; it takes "
                             f"{'1' if kind.values == 1 else f'1 or {kind.values}'}")
        if p is not None and kind.resizes:
            raise ValueError(f"gives {name} a probability; it changes the image size, so every image gets it")
    return tuple((n, tuple(v) if v else None, p) for n, v, p in out)


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _value(name: str, text: str, what: str = "strength") -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"gives {name} the {what} {text!r}, which is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"gives {name} the {what} {text}, which is not finite")
    return value


def _probability(name: str, text: str) -> float:
    p = _value(name, text, "probability")
    if not 0 < p <= 1:
        raise ValueError(f"gives {name} the probability {text}, which is not in (0, 1]")
    return p


def check_strengths(augments, image_size: int) -> list[tuple[str, float | tuple, float]]:
    """The augmentations as (name, strength, p), every strength filled in and checked against
    the image size it meets (after the resizing ones before it)."""
    out = []
    size = image_size
    for item in augments:
        name, value = item[0], item[1]
        p = item[2] if len(item) > 2 and item[2] is not None else 1.0
        kind = KINDS[name]
        given = value if isinstance(value, tuple) else (() if value is None else (float(value),))
        if not given and kind.default(size) is None:
            raise FastablateError(f"--augment {name}: give its strength ({kind.unit}), e.g. {name}:{size * 2}")
        values = given or (kind.default(size),)
        for s in values:
            low_bad = s < kind.low if kind.low_ok else s <= kind.low
            if low_bad or s > kind.high(size):
                raise FastablateError(f"--augment {name}:{s:g}: the strength ({kind.unit}) must be in "
                                      f"{'[' if kind.low_ok else '('}{kind.low:g}, {kind.high(size):g}] for "
                                      f"{size}x{size} images")
        if kind.values > 1:
            strength = values * kind.values if len(values) == 1 else tuple(values)
            strength = (*strength[:3], 0.0) if len(values) == 1 else strength  # one value: no hue
        else:
            strength = float(values[0])
        if kind.resizes:
            size = int(strength)
        out.append((name, strength, float(p)))
    return out


def output_size(augments, image_size: int) -> int:
    """The side of the images after the checked ``augments``."""
    for item in augments:
        if KINDS[item[0]].resizes:
            image_size = int(item[1])
    return image_size


def label(item) -> str:
    """How results name a checked augmentation: crop:4, color-jitter:0.4,0.4,0.4,0, blur:1@0.5."""
    name, s = item[0], item[1]
    p = item[2] if len(item) > 2 else 1.0
    text = ",".join(f"{v:g}" for v in s) if isinstance(s, tuple) else f"{s:g}"
    return f"{name}:{text}" + (f"@{p:g}" if p < 1 else "")


def augment(x: Tensor, augments, gen: Gen | None = None) -> Tensor:
    """Apply the checked augmentations, (name, strength) or (name, strength, p), in order to the
    float batch ``x``; with p < 1 each image gets one with probability p."""
    for item in augments:
        name, s = item[0], item[1]
        p = item[2] if len(item) > 2 else 1.0
        if KINDS[name].values > 1 and not isinstance(s, tuple):
            s = (s, s, s, 0.0)
        if p >= 1:
            x = KINDS[name].fn(x, s, gen)
            continue
        chosen = _u(x.shape[0], 0, 1, gen, x.device) < p
        x = torch.where(chosen[:, None, None, None], KINDS[name].fn(x, s, gen), x)
    return x
