"""Typed public wrappers of the fastablate kernels; each falls back to its pure-PyTorch
reference (``fastablate.ops._reference``) where no compiled kernel exists for the device."""
from fastablate.ops.block_skip import BlockSkip, block_skip
from fastablate.ops.gaussian_noise import GaussianNoise, gaussian_noise
from fastablate.ops.sparse_pixel_update import sparse_pixel_update

__all__ = ["BlockSkip", "GaussianNoise", "block_skip", "gaussian_noise", "sparse_pixel_update"]
