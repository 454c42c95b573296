"""Batched augmentations: random parameters per image, applied to a whole batch at once on
its device, drawn from a seeded generator (so a run reproduces).

``--augment crop,flip,rotation:15`` names them in order, each with an optional strength:

| name | strength (default) | what each image gets |
|---|---|---|
| ``crop`` | padding in px (size/8) | a random crop of the zero-padded image (He et al. 2016) |
| ``flip`` | probability (0.5) | a horizontal flip |
| ``rotation`` | degrees (15) | a rotation by an angle uniform in [-d, d], zeros outside |
| ``color-jitter`` | s (0.4) | brightness, contrast and saturation factors uniform in [1-s, 1+s] |
| ``resized-crop`` | min area (0.6) | a crop of area [a, 1] and aspect [3/4, 4/3], resized back |
| ``center-crop`` | side in px (7/8 size) | the central square, resized back to the full size |
| ``cutout`` | side in px (size/4) | a zeroed square at a random place (DeVries & Taylor 2017) |
| ``blur`` | max sigma in px (1.0) | a Gaussian blur of sigma uniform in [0.1, max] |
| ``salt-pepper`` | fraction (0.02) | that fraction of pixels set to black or white, all channels |
| ``gaussian`` | std (0.05) | Gaussian noise of that std (``fastablate.ops.gaussian_noise``), clipped |

Images are float (N, C, H, W) in [0, 1]; every function keeps the shape and the range.
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


def color_jitter(x: Tensor, s: float, gen: Gen | None) -> Tensor:
    """Brightness, contrast, saturation in that order (torchvision's ColorJitter without hue)."""
    n = x.shape[0]
    b, c, sat = (_u(n, max(0.0, 1 - s), 1 + s, gen, x.device).view(n, 1, 1, 1) for _ in range(3))
    x = (x * b).clamp_(0, 1)  # a new tensor: the rest works in place
    mean = _gray(x).mean((2, 3), keepdim=True)
    x.sub_(mean).mul_(c).add_(mean).clamp_(0, 1)
    gray = _gray(x)
    return x.sub_(gray).mul_(sat).add_(gray).clamp_(0, 1)


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
    from torchvision.transforms.v2.functional import resize

    h, w = x.shape[2:]
    top, left = (h - int(side)) // 2, (w - int(side)) // 2
    return resize(x[:, :, top:top + int(side), left:left + int(side)], [h, w], antialias=True)


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
    default: Callable[[int], float]  # strength from the image size
    low: float  # valid strengths: low < s <= high (low itself allowed when low_ok)
    high: Callable[[int], float]
    low_ok: bool = False
    unit: str = ""


KINDS: dict[str, Kind] = {
    "crop": Kind(crop, lambda s: max(1, s // 8), 0, lambda s: s, True, "px of padding"),
    "flip": Kind(flip, lambda s: 0.5, 0, lambda s: 1, True, "probability"),
    "rotation": Kind(rotation, lambda s: 15.0, 0, lambda s: 180, True, "degrees"),
    "color-jitter": Kind(color_jitter, lambda s: 0.4, 0, lambda s: 1, True, "factor spread"),
    "resized-crop": Kind(resized_crop, lambda s: 0.6, 0, lambda s: 1, False, "min area fraction"),
    "center-crop": Kind(center_crop, lambda s: s * 7 // 8, 0, lambda s: s, False, "px side"),
    "cutout": Kind(cutout, lambda s: max(1, s // 4), 0, lambda s: s, False, "px side"),
    "blur": Kind(blur, lambda s: 1.0, 0, lambda s: s / 2, False, "px max sigma"),
    "salt-pepper": Kind(salt_pepper, lambda s: 0.02, 0, lambda s: 1, True, "fraction of pixels"),
    "gaussian": Kind(gaussian, lambda s: 0.05, 0, lambda s: 1, True, "std"),
}


def parse_augment(text: str) -> tuple[tuple[str, float | None], ...]:
    """'crop,rotation:15' -> (('crop', None), ('rotation', 15.0)); a ValueError names the problem."""
    out = []
    for item in str(text).split(","):
        name, _, strength = item.strip().partition(":")
        if name not in KINDS:
            raise ValueError(f"has an unknown augmentation {name!r}; choose from: {', '.join(KINDS)}")
        try:
            value = float(strength) if strength else None
        except ValueError:
            raise ValueError(f"gives {name} the strength {strength!r}, which is not a number") from None
        if value is not None and not math.isfinite(value):
            raise ValueError(f"gives {name} the strength {strength}, which is not finite")
        out.append((name, value))
    return tuple(out)


def check_strengths(augments, image_size: int) -> list[tuple[str, float]]:
    """The augmentations with every strength filled in and checked against the image size."""
    out = []
    for name, value in augments:
        kind = KINDS[name]
        s = kind.default(image_size) if value is None else value
        low_bad = s < kind.low if kind.low_ok else s <= kind.low
        if low_bad or s > kind.high(image_size):
            raise FastablateError(f"--augment {name}:{s:g}: the strength ({kind.unit}) must be in "
                                  f"{'[' if kind.low_ok else '('}{kind.low:g}, {kind.high(image_size):g}] for "
                                  f"{image_size}x{image_size} images")
        out.append((name, float(s)))
    return out


def augment(x: Tensor, augments: list[tuple[str, float]], gen: Gen | None = None) -> Tensor:
    """Apply the (name, strength) augmentations in order to the float batch ``x``."""
    for name, s in augments:
        x = KINDS[name].fn(x, s, gen)
    return x
