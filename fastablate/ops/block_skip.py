"""block_skip: the residual add of a unit with a per-row keep mask (lesion in the batch).

Veit, Wilber, Belongie 2016, "Residual Networks Behave Like Ensembles of Relatively
Shallow Networks": deleting a residual block at test time keeps only its shortcut.
Stacking lesion variants along the batch makes that a per-row choice.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastablate import _ext
from fastablate.ops import checks, reference


def block_skip(shortcut: Tensor, residual: Tensor, keep: Tensor, *, relu: bool = True,
               index: Tensor | None = None, backward_keep: Tensor | None = None,
               backward_shortcut: Tensor | None = None) -> Tensor:
    """post(shortcut + keep[:, None, None, None] * residual), post = ReLU if ``relu``.

    Args:
        shortcut: (N, ...) floating tensor: the unit's shortcut output.
        residual: (N, ...) like ``shortcut``; or (M, ...) with ``index``.
        keep: (N,) bool; rows with False take the shortcut alone (the unit is lesioned).
        relu: ReLU after the add (post-activation ResNets); identity otherwise.
        index: (M,) int64 distinct rows of the output, one per row of ``residual``
            (gather/scatter form: the residual was computed for those rows only).
            Distinctness is checked on CPU; on CUDA it is the caller's promise.
        backward_keep: (N,) bool; rows whose gradient flows into ``residual``
            (default ``keep``). Lets a path-gradient analysis run the full forward
            while back-propagating through chosen residual branches only.
        backward_shortcut: (N,) bool; rows whose gradient flows into ``shortcut``
            (default all): with ``backward_keep`` its complement, each row's gradient
            follows one branch of the unit, so a stack of rows follows one path each
            (Veit et al. 2016, Sec. 6).

    Returns:
        (N, ...) tensor in the memory format of ``shortcut``.
    """
    if backward_keep is not None or backward_shortcut is not None:
        for name, mask in (("backward_keep", backward_keep), ("backward_shortcut", backward_shortcut)):
            if mask is not None:
                checks.check_rows_mask("block_skip", name, mask, shortcut)
        return _GatedBlockSkip.apply(shortcut, residual, keep, relu, index,
                                     keep if backward_keep is None else backward_keep, backward_shortcut)
    if _ext.has_kernel(shortcut.device, "block_skip"):
        return torch.ops.fastablate.block_skip.default(shortcut, residual, keep, relu, index)
    return reference.block_skip(shortcut, residual, keep, relu=relu, index=index)


def _grads(grad: Tensor, out: Tensor, gate: Tensor, relu: bool, index: Tensor | None,
           shortcut_gate: Tensor | None = None):
    """(d shortcut, d residual) of post(shortcut + gate[row] * residual), the shortcut's
    gradient gated by ``shortcut_gate`` rows when given."""
    g = torch.ops.aten.threshold_backward(grad, out, 0) if relu else grad
    view = (-1,) + (1,) * (g.dim() - 1)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    gs = g if shortcut_gate is None else torch.where(shortcut_gate.view(view), g, zero)
    if index is None:
        return gs, torch.where(gate.view(view), g, zero)
    return gs, torch.where(gate.index_select(0, index).view(view), g.index_select(0, index), zero)


class _GatedBlockSkip(torch.autograd.Function):
    """block_skip whose residual gradient follows ``backward_keep`` instead of ``keep``, and
    whose shortcut gradient follows ``backward_shortcut``."""

    @staticmethod
    def forward(ctx, shortcut, residual, keep, relu, index, backward_keep, backward_shortcut):
        with torch.no_grad():
            out = block_skip(shortcut, residual, keep, relu=relu, index=index)
        ctx.save_for_backward(out, backward_keep, index, backward_shortcut)
        ctx.relu = relu
        return out

    @staticmethod
    def backward(ctx, grad):
        out, backward_keep, index, backward_shortcut = ctx.saved_tensors
        gs, gr = _grads(grad, out, backward_keep, ctx.relu, index, backward_shortcut)
        return gs, gr, None, None, None, None, None


if _ext.loaded:
    @torch.library.register_fake("fastablate::block_skip")
    def _(shortcut, residual, keep, relu, index):
        checks.block_skip(shortcut, residual, keep, relu, index)
        return checks.empty_like_output(shortcut)

    def _setup_context(ctx, inputs, output):
        _, _, keep, relu, index = inputs
        ctx.save_for_backward(output, keep, index)
        ctx.relu = relu

    def _backward(ctx, grad):
        out, keep, index = ctx.saved_tensors
        gs, gr = _grads(grad, out, keep, ctx.relu, index)
        return gs, gr, None, None, None

    torch.library.register_autograd("fastablate::block_skip", _backward, setup_context=_setup_context)


class BlockSkip(nn.Module):
    """Module form of :func:`block_skip` for a fixed keep mask (e.g. one lesion plan)."""

    def __init__(self, keep: Tensor, relu: bool = True):
        super().__init__()
        self.register_buffer("keep", keep.to(torch.bool), persistent=False)
        self.relu = relu

    def forward(self, shortcut: Tensor, residual: Tensor) -> Tensor:
        return block_skip(shortcut, residual, self.keep, relu=self.relu)

    def extra_repr(self) -> str:
        return f"kept={int(self.keep.sum())}/{self.keep.numel()}, relu={self.relu}"
