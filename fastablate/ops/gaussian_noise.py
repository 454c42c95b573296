"""gaussian_noise: masked Gaussian noise in one pass, drawn inside the kernel.

The noise on element g (g = offset + the element's row-major index) comes from Philox-4x32-10
(Salmon et al. 2011) keyed by ``seed``: it depends on (seed, g) alone, so a result does not
change with the number of CPU threads, the memory layout of ``x`` or how a tensor is split
into calls (give each part its ``offset``). Nothing of size ``x`` is materialized besides the
output.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastablate import _ext
from fastablate.ops import checks, reference


def gaussian_noise(x: Tensor, sigma: float | Tensor, *, p: float = 1.0, mask: Tensor | None = None, seed: int = 0,
                   offset: int = 0, inplace: bool = False) -> Tensor:
    """``x + m * sigma * z``, z ~ N(0, 1) from Philox keyed by (seed, offset + element index).

    Args:
        x: floating tensor, (N, C, ...) when ``sigma`` is per channel.
        sigma: standard deviation, a float or a (C,) tensor (one per channel), >= 0.
        p: probability that an element is perturbed, a Bernoulli(p) mask drawn in the same
            pass (ignored when ``mask`` is given).
        mask: bool, broadcastable to ``x``: per element, per sample ``(N, 1, 1, 1)``, per
            channel ``(1, C, 1, 1)`` or ``(N, C, 1, 1)``. Unmasked elements are ``x`` exactly.
        seed: 64-bit key; the same (seed, offset, shape, dtype, device) gives bit-identical output.
        offset: index of ``x``'s first element in the stream of draws.
        inplace: write into ``x`` (no autograd).

    Returns:
        A tensor like ``x`` (``x`` itself when ``inplace``). The gradient w.r.t. ``x`` is the identity.
    """
    scalar, channel = reference.split_sigma(sigma)
    if _ext.has_kernel(x.device, "gaussian_noise"):
        args = (x, scalar, channel, float(p), mask, int(seed), int(offset))
        if inplace:
            torch.ops.fastablate.gaussian_noise_.default(*args)
            return x
        return torch.ops.fastablate.gaussian_noise.default(*args)
    out = reference.gaussian_noise(x, sigma, p=p, mask=mask, seed=seed, offset=offset)
    return x.copy_(out) if inplace else out


if _ext.loaded:
    @torch.library.register_fake("fastablate::gaussian_noise")
    def _(x, sigma, channel_sigma, p, mask, seed, offset):
        checks.gaussian_noise(x, sigma, channel_sigma, p, mask, seed, offset)
        return checks.empty_like_output(x)

    @torch.library.register_fake("fastablate::gaussian_noise_")
    def _(x, sigma, channel_sigma, p, mask, seed, offset):
        checks.gaussian_noise(x, sigma, channel_sigma, p, mask, seed, offset)
        return None

    def _setup_context(ctx, inputs, output):
        pass  # the gradient is the identity: nothing to save

    def _backward(ctx, grad):
        return grad, None, None, None, None, None, None

    torch.library.register_autograd("fastablate::gaussian_noise", _backward, setup_context=_setup_context)


class GaussianNoise(nn.Module):
    """Module form: adds noise in training and evaluation alike (a robustness probe, not a
    regularizer); each call advances ``offset`` so successive batches get fresh noise."""

    def __init__(self, sigma: float, p: float = 1.0, seed: int = 0):
        super().__init__()
        self.sigma, self.p, self.seed, self.offset = sigma, p, seed, 0

    def forward(self, x: Tensor) -> Tensor:
        out = gaussian_noise(x, self.sigma, p=self.p, seed=self.seed, offset=self.offset)
        self.offset += x.numel()
        return out

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, p={self.p}, seed={self.seed}"
