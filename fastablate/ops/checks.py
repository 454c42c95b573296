"""Argument checks of the fastablate ops in Python, with the C++ kernels' messages.

``csrc/checks.h`` and ``csrc/<op>.h`` check the arguments of the compiled kernels; the
functions here check the same things in the same order and raise ``RuntimeError`` with the
same text, so the pure-PyTorch references (the fallback) and the fake kernels
(torch.compile) fail exactly as the kernels do. Checks that read tensor data (index ranges
and distinctness) run on CPU tensors only, as in C++, and not on fake tensors.

Also here: the output layout the kernels give, for the fake kernels.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_SCALAR_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
                 torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
                 torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
                 torch.complex128: "ComplexDouble"}


def dtype_name(dtype: torch.dtype) -> str:
    """The name c10 prints for a dtype (``Float``, ``Long``, ...)."""
    return _SCALAR_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def sizes(t: Tensor) -> str:
    """Sizes as c10 prints them: ``[3, 4]``."""
    return "[" + ", ".join(str(int(d)) for d in t.shape) + "]"


def number(v: float) -> str:
    """A double as C++ streams print it (6 significant digits)."""
    return "%g" % v


def _check(ok: bool, *parts) -> None:
    if not ok:
        raise RuntimeError("".join(str(p) for p in parts))


def check_floating(op: str, name: str, t: Tensor) -> None:
    _check(t.is_floating_point(), op, ": ", name, " must be a floating tensor, got ", dtype_name(t.dtype))


def check_same_device_dtype(op: str, name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    _check(a.device == b.device, op, ": ", name_b, " is on ", b.device, ", ", name_a, " is on ", a.device)
    _check(a.dtype == b.dtype, op, ": ", name_b, " has dtype ", dtype_name(b.dtype), ", ", name_a, " has dtype ",
           dtype_name(a.dtype))


def check_rows_mask(op: str, name: str, mask: Tensor, x: Tensor) -> None:
    _check(x.dim() >= 1, op, ": x must have a batch dimension, got a 0-d tensor")
    _check(mask.dtype == torch.bool, op, ": ", name, " must be bool, got ", dtype_name(mask.dtype))
    _check(mask.dim() == 1 and mask.shape[0] == x.shape[0], op, ": ", name, " has shape ", sizes(mask),
           ", expected (", x.shape[0], ",)")
    _check(mask.device == x.device, op, ": ", name, " is on ", mask.device, ", x is on ", x.device)


def _reads_data(t: Tensor) -> bool:
    """Whether checks may read ``t``'s values: a real CPU tensor (not fake, not meta)."""
    return t.device.type == "cpu" and not isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def block_skip(shortcut: Tensor, residual: Tensor, keep: Tensor, relu: bool, index: Tensor | None) -> None:
    """csrc/block_skip.h."""
    op = "block_skip"
    check_floating(op, "shortcut", shortcut)
    check_same_device_dtype(op, "shortcut", shortcut, "residual", residual)
    check_rows_mask(op, "keep", keep, shortcut)
    n = shortcut.shape[0]
    _check(residual.dim() == shortcut.dim() and residual.shape[1:] == shortcut.shape[1:], op, ": residual has shape ",
           sizes(residual), ", shortcut has shape ", sizes(shortcut), " (all but the first dimension must match)")
    if index is None:
        _check(residual.shape[0] == n, op, ": residual has ", residual.shape[0], " rows, shortcut has ", n,
               " (pass index= for the gather form)")
        return
    _check(index.dtype == torch.int64 and index.dim() == 1, op, ": index must be a 1-d int64 tensor, got ",
           dtype_name(index.dtype), " of shape ", sizes(index))
    _check(index.device == shortcut.device, op, ": index is on ", index.device, ", shortcut is on ", shortcut.device)
    _check(index.shape[0] == residual.shape[0], op, ": index has ", index.shape[0], " entries, residual has ",
           residual.shape[0], " rows")
    if index.numel() > 0 and _reads_data(index):
        seen: set[int] = set()
        for j, p in enumerate(index.tolist()):
            _check(0 <= p < n, op, ": index[", j, "] = ", p, " is out of range [0, ", n, ")")
            _check(p not in seen, op, ": index holds row ", p, " twice; rows must be distinct")
            seen.add(p)


def gaussian_noise(x: Tensor, sigma: float, channel_sigma: Tensor | None, p: float, mask: Tensor | None,
                   seed: int, offset: int) -> None:
    """csrc/gaussian_noise.h."""
    op = "gaussian_noise"
    check_floating(op, "x", x)
    _check(math.isfinite(sigma) and sigma >= 0, op, ": sigma must be finite and >= 0, got ", number(sigma))
    _check(0 <= p <= 1, op, ": p must be in [0, 1], got ", number(p))
    _check(offset >= 0, op, ": offset must be >= 0, got ", offset)
    channels = x.shape[1] if x.dim() >= 2 else 1
    if channel_sigma is not None:
        _check(x.dim() >= 2, op, ": a per-channel sigma needs x with a channel dimension, x has shape ", sizes(x))
        _check(channel_sigma.dim() == 1 and channel_sigma.shape[0] == channels, op, ": sigma has shape ",
               sizes(channel_sigma), ", expected (", channels, ",) for x of shape ", sizes(x))
        _check(channel_sigma.device == x.device, op, ": sigma is on ", channel_sigma.device, ", x is on ", x.device)
    if mask is not None:
        _check(mask.dtype == torch.bool, op, ": mask must be bool, got ", dtype_name(mask.dtype))
        _check(mask.device == x.device, op, ": mask is on ", mask.device, ", x is on ", x.device)
        broadcasts = mask.dim() <= x.dim() and all(
            m in (1, d) for m, d in zip((1,) * (x.dim() - mask.dim()) + tuple(mask.shape), x.shape))
        _check(broadcasts, op, ": mask of shape ", sizes(mask), " does not broadcast to x of shape ", sizes(x))


def sparse_pixel_update(x: Tensor, grad: Tensor, k: int, step: float, lo: Tensor, hi: Tensor,
                        indices: Tensor | None, mode: str) -> None:
    """csrc/sparse_pixel_update.h."""
    op = "sparse_pixel_update"
    check_floating(op, "x", x)
    _check(x.dim() == 4, op, ": x must be (N, C, H, W), got shape ", sizes(x))
    check_same_device_dtype(op, "x", x, "grad", grad)
    _check(grad.shape == x.shape, op, ": grad has shape ", sizes(grad), ", x has shape ", sizes(x))
    _check(mode in ("sign", "l2"), op, ": mode must be 'sign' or 'l2', got '", mode, "'")
    _check(math.isfinite(step), op, ": step must be finite, got ", number(step))
    pixels = x.shape[2] * x.shape[3]
    _check(0 <= k <= pixels, op, ": k must be in [0, H*W = ", pixels, "], got ", k)
    for b in (lo, hi):
        _check(b.dim() == 1 and b.shape[0] == x.shape[1] and b.dtype == torch.float64, op,
               ": bounds must be float64 tensors of shape (", x.shape[1], ",), got ", dtype_name(b.dtype), " ",
               sizes(b))
        _check(b.device == x.device, op, ": bounds are on ", b.device, ", x is on ", x.device)
    if indices is not None:
        _check(indices.dtype == torch.int64, op, ": indices must be int64, got ", dtype_name(indices.dtype))
        _check(indices.dim() == 2 and indices.shape[0] == x.shape[0] and indices.shape[1] == k, op,
               ": indices has shape ", sizes(indices), ", expected (", x.shape[0], ", ", k, ")")
        _check(indices.device == x.device, op, ": indices is on ", indices.device, ", x is on ", x.device)
        if indices.numel() > 0 and _reads_data(indices):
            mn, mx = int(indices.min()), int(indices.max())
            _check(mn >= 0 and mx < pixels, op, ": indices must be in [0, ", pixels, "), got values in [", mn, ", ",
                   mx, "]")


def empty_like_output(t: Tensor) -> Tensor:
    """An empty tensor like ``t`` in the layout the kernels produce: channels_last when ``t``
    is laid out that way (ATen's suggest_memory_format), contiguous otherwise."""
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(t, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
