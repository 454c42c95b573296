"""Typed public wrappers of the fastablate kernels; each falls back to its pure-PyTorch
reference (:mod:`fastablate.ops.reference`) where no compiled kernel exists for the device."""
from __future__ import annotations

from fastablate import _ext
from fastablate.ops.block_skip import BlockSkip, block_skip
from fastablate.ops.gaussian_noise import GaussianNoise, gaussian_noise
from fastablate.ops.sparse_pixel_update import sparse_pixel_update

OPS = ("block_skip", "gaussian_noise", "sparse_pixel_update")
DEVICE_TYPES = ("cpu", "cuda")


def kernel_status() -> dict[str, dict[str, bool]]:
    """For every op and device type, whether a compiled kernel runs it (else the reference does)."""
    return {op: {d: _ext.has_kernel(d, op) for d in DEVICE_TYPES} for op in OPS}


def load_error() -> str | None:
    """Why the compiled kernels are not loaded, or None when they are."""
    return _ext.load_error()


__all__ = ["BlockSkip", "DEVICE_TYPES", "GaussianNoise", "OPS", "block_skip", "gaussian_noise", "kernel_status",
           "load_error", "sparse_pixel_update"]
