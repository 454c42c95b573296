"""sparse_pixel_update: one step of a sparse (L0) attack on the k most salient pixels.

The white-box pixel selection of saliency-map attacks (Papernot et al. 2016, JSMA) with the
"all channels of a pixel" budget of one-pixel/few-pixel attacks (Su et al. 2019): for each
image, the k pixels with the largest sum over channels of |grad| move in every channel,
then are clamped to the valid range. Selection, step and clamp are one pass.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

from fastablate import _ext
from fastablate.ops import checks, reference

Bound = float | Sequence[float] | Tensor


def _bounds(b: Bound, channels: int, device: torch.device) -> Tensor:
    if isinstance(b, (int, float)):
        return _scalar_bounds(float(b), channels, device)
    t = torch.as_tensor(b, dtype=torch.float64).to(device)
    return t.expand(channels).contiguous() if t.dim() == 0 else t


@functools.lru_cache(maxsize=64)
def _scalar_bounds(b: float, channels: int, device: torch.device) -> Tensor:
    # An attack calls the op every step with the same bounds; the op only reads them.
    return torch.full((channels,), b, dtype=torch.float64, device=device)


def sparse_pixel_update(x_adv: Tensor, grad: Tensor, k: int, step: float, *, lo: Bound = 0.0, hi: Bound = 1.0,
                        indices: Tensor | None = None, mode: str = "sign") -> tuple[Tensor, Tensor]:
    """Move all channels of the k most salient pixels of each image, then clamp.

    Args:
        x_adv: (N, C, H, W) current images.
        grad: (N, C, H, W) gradient of the attack objective w.r.t. ``x_adv`` (finite).
        k: pixels per image, 0 <= k <= H*W.
        step: step size: per channel in "sign" mode; the L2 length over the chosen entries in "l2" mode.
        lo, hi: bounds, floats or per-channel sequences/tensors of length C.
        indices: (N, k) int64 pixel indices (h * W + w), distinct per image, to use instead of
            the saliency choice.
        mode: "sign" (``step * sign(grad)``) or "l2" (``step * grad / ||grad||`` over the k*C chosen entries).

    Returns:
        (new images like ``x_adv``, (N, k) int64 chosen pixel indices, most salient first;
        ties go to the lower index). Not differentiable: attacks call it on detached tensors.
    """
    c = x_adv.shape[1] if x_adv.dim() == 4 else 1
    lo_t, hi_t = _bounds(lo, c, x_adv.device), _bounds(hi, c, x_adv.device)
    if _ext.has_kernel(x_adv.device, "sparse_pixel_update"):
        return torch.ops.fastablate.sparse_pixel_update.default(x_adv, grad, int(k), float(step), lo_t, hi_t,
                                                                indices, mode)
    return reference.sparse_pixel_update(x_adv, grad, int(k), float(step), lo=lo_t, hi=hi_t, indices=indices,
                                          mode=mode)


if _ext.loaded:
    @torch.library.register_fake("fastablate::sparse_pixel_update")
    def _(x, grad, k, step, lo, hi, indices, mode):
        checks.sparse_pixel_update(x, grad, k, step, lo, hi, indices, mode)
        return checks.empty_like_output(x), x.new_empty((x.shape[0], k), dtype=torch.int64)
