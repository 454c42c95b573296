"""Pure-PyTorch references of the fastablate ops.

Each is used three times: as the fallback when no compiled kernel exists for a device,
as the oracle in tests, and as the baseline in bench/.
"""
from __future__ import annotations

import torch
from torch import Tensor


def block_skip(shortcut: Tensor, residual: Tensor, keep: Tensor, *, relu: bool = True,
               index: Tensor | None = None) -> Tensor:
    """post(shortcut + keep[row] * residual); see fastablate.ops.block_skip."""
    view = (-1,) + (1,) * (shortcut.dim() - 1)
    if index is None:
        # where, not keep * residual: a dropped row must not turn inf/nan in residual into nan.
        out = torch.where(keep.view(view), shortcut + residual, shortcut)
    else:
        rows = shortcut.index_select(0, index)
        added = torch.where(keep.index_select(0, index).view(view), rows + residual, rows)
        out = shortcut.index_copy(0, index, added)
    return torch.relu(out) if relu else out
