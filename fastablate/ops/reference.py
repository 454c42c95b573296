"""Pure-PyTorch references of the fastablate ops.

Each is used three times: as the fallback when no compiled kernel exists for a device,
as the oracle in tests, and as the baseline in bench/. Each checks its arguments first
with :mod:`fastablate.ops.checks`, which raises the compiled kernels' messages.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastablate.ops import checks


def block_skip(shortcut: Tensor, residual: Tensor, keep: Tensor, *, relu: bool = True,
               index: Tensor | None = None) -> Tensor:
    """post(shortcut + keep[row] * residual); see fastablate.ops.block_skip."""
    checks.block_skip(shortcut, residual, keep, relu, index)
    view = (-1,) + (1,) * (shortcut.dim() - 1)
    if index is None:
        # where, not keep * residual: a dropped row must not turn inf/nan in residual into nan.
        out = torch.where(keep.view(view), shortcut + residual, shortcut)
    else:
        rows = shortcut.index_select(0, index)
        added = torch.where(keep.index_select(0, index).view(view), rows + residual, rows)
        out = shortcut.index_copy(0, index, added)
    return torch.relu(out) if relu else out


_MASK32 = 0xFFFFFFFF


def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * m for int64 tensors a < 2^32, without int64 overflow."""
    lo16, hi16 = a & 0xFFFF, a >> 16
    t_lo, t_hi = lo16 * m, hi16 * m  # each < 2^48
    low = t_lo + ((t_hi & 0xFFFF) << 16)  # < 2^49
    return (t_hi >> 16) + (low >> 32), low & _MASK32


def philox4x32_10(counter: Tensor, seed: int) -> list[Tensor]:
    """Philox-4x32-10 of 64-bit counters (int64 tensor) and a 64-bit key: four uint32 words
    as int64 tensors (Salmon et al. 2011)."""
    c = [counter & _MASK32, (counter >> 32) & _MASK32, torch.zeros_like(counter), torch.zeros_like(counter)]
    # (counter >> 32) & _MASK32 is right for negative int64 too: the shift sign-extends, the mask drops it.
    seed &= (1 << 64) - 1
    k0, k1 = seed & _MASK32, seed >> 32
    for _ in range(10):
        hi0, lo0 = _mulhilo(c[0], 0xD2511F53)
        hi1, lo1 = _mulhilo(c[2], 0xCD9E8D57)
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c


def _box_muller(ua: Tensor, ub: Tensor) -> tuple[Tensor, Tensor]:
    a = (((ua >> 9) << 1) | 1).double() * 2.0 ** -24  # (2k + 1) / 2^24: in (0, 1), exact in float32
    b = (ub >> 8).double() * 2.0 ** -24  # [0, 1)
    rad = torch.sqrt(-2 * torch.log(a))
    return rad * torch.cos(2 * torch.pi * b), rad * torch.sin(2 * torch.pi * b)


def philox_normals(numel: int, seed: int, offset: int, device, *,
                   uniforms: bool = True) -> tuple[Tensor, Tensor | None]:
    """The N(0, 1) values (float32) and, if ``uniforms``, the 32-bit uniforms (int64) of
    elements offset .. offset + numel - 1: element g is lane g & 3 of quad g >> 2, whose
    normals come from Philox counter g >> 2 (two Box-Muller pairs) and uniforms from counter
    (g >> 2) | 2^63."""
    g = torch.arange(offset, offset + numel, device=device, dtype=torch.int64)
    quad, lane = g >> 2, g & 3
    r = philox4x32_10(quad, seed)
    z0, z1 = _box_muller(r[0], r[1])
    z2, z3 = _box_muller(r[2], r[3])
    z = torch.stack([z0, z1, z2, z3]).gather(0, lane[None]).squeeze(0)
    if not uniforms:
        return z.float(), None
    # quad | 2^63 as a signed int64: the top bit is the sign bit.
    w = philox4x32_10(quad | torch.iinfo(torch.int64).min, seed)
    u = torch.stack(w).gather(0, lane[None]).squeeze(0)
    return z.float(), u


def split_sigma(sigma: float | Tensor) -> tuple[float, Tensor | None]:
    """(scalar, per-channel tensor or None): the two sigma arguments of the kernels."""
    if isinstance(sigma, Tensor):
        if sigma.dim() == 0:
            return float(sigma), None
        return 1.0, sigma
    return float(sigma), None


def gaussian_noise(x: Tensor, sigma: float | Tensor, *, p: float = 1.0, mask: Tensor | None = None, seed: int = 0,
                   offset: int = 0) -> Tensor:
    """x + m * sigma * z with z from Philox(seed, offset + element index); see fastablate.ops.gaussian_noise."""
    checks.gaussian_noise(x, *split_sigma(sigma), p, mask, seed, offset)
    bernoulli = mask is None and p < 1  # like the kernels, draw the uniform stream only when used
    z, u = philox_normals(x.numel(), seed, offset, x.device, uniforms=bernoulli)
    z = z.view(x.shape)
    if mask is not None:
        keep = mask.expand(x.shape)
    elif bernoulli:
        keep = (u < (int(p * 4294967296.0) if p > 0 else 0)).view(x.shape)
    else:
        keep = torch.ones((), dtype=torch.bool, device=x.device).expand(x.shape)
    if isinstance(sigma, Tensor) and sigma.dim() == 1:
        sigma = sigma.float().view((1, -1) + (1,) * (x.dim() - 2))  # float32, as the kernels hold it
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # the kernels' opmath type
    noisy = (x.to(acc) + sigma * z.to(acc)).to(x.dtype)
    return torch.where(keep, noisy, x)


def sparse_pixel_update(x_adv: Tensor, grad: Tensor, k: int, step: float, *, lo: Tensor, hi: Tensor,
                        indices: Tensor | None = None, mode: str = "sign") -> tuple[Tensor, Tensor]:
    """See fastablate.ops.sparse_pixel_update; ``lo``/``hi`` are float64 (C,) tensors here."""
    checks.sparse_pixel_update(x_adv, grad, k, step, lo, hi, indices, mode)
    n, c, h, w = x_adv.shape
    acc = torch.float64 if x_adv.dtype == torch.float64 else torch.float32
    g = grad.reshape(n, c, h * w)
    if indices is None:
        sal = torch.zeros(n, h * w, dtype=acc, device=x_adv.device)
        for ch in range(c):  # channels in order, as the kernels sum them
            sal += g[:, ch].to(acc).abs()
        # Stable and descending: ties keep the lower pixel index first.
        indices = torch.sort(sal, dim=1, descending=True, stable=True).indices[:, :k]
    idx = indices[:, None, :].expand(n, c, k)
    gsel = g.gather(2, idx).double()
    if mode == "l2":
        # Pixel by pixel, channels inner, one after another: the kernels' order (cumsum is sequential on CPU).
        sq = (gsel * gsel).transpose(1, 2).reshape(n, -1).cumsum(1)[:, -1] if k else gsel.new_zeros(n)
        # A true division (float / tensor would be reciprocal-then-multiply, off by an ulp).
        scale = torch.where(sq > 0, torch.full_like(sq, step) / sq.sqrt(), torch.zeros_like(sq))
        delta = (gsel * scale[:, None, None]).to(acc)
    else:
        delta = torch.tensor(step, dtype=acc) * torch.sign(gsel).to(acc)
    out = x_adv.reshape(n, c, h * w).clone()
    v = out.gather(2, idx).to(acc) + delta
    v = torch.minimum(torch.maximum(v, lo.to(acc).view(1, c, 1)), hi.to(acc).view(1, c, 1))
    out.scatter_(2, idx, v.to(x_adv.dtype))
    return out.view(n, c, h, w), indices.clone()
