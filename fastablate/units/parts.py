"""How a block and a model compute, as the unit view (:mod:`fastablate.units`) reads them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

Fn = Callable[[Tensor], Tensor]
KINDS = ("identity-skip", "projection-skip", "plain")


@dataclass
class BlockParts:
    """How one block computes: ``post(shortcut(x) + residual(x))``.

    Args:
        residual: the residual branch (for a plain unit: the whole unit).
        shortcut: the shortcut; an ``nn.Identity`` instance for an identity skip; None for
            a plain unit.
        relu: post is a ReLU (post-activation ResNets); False: the identity.
        post: any other post-activation (then ``relu`` is ignored); engines that fuse the
            add with the activation (``block_skip``) fall back to the plain path for it.
    """

    residual: Fn
    shortcut: Fn | None
    relu: bool = False
    post: Fn | None = None

    @property
    def post_kind(self) -> str:
        """"relu", "identity" or "custom"."""
        return "custom" if self.post is not None else "relu" if self.relu else "identity"

    def apply_post(self, x: Tensor) -> Tensor:
        if self.post is not None:
            return self.post(x)
        return torch.relu(x) if self.relu else x


@dataclass
class ModelParts:
    """A model split for the unit view: ``head(block_n(... block_1(stem(x))))``."""

    stem: Fn
    blocks: list[tuple[str, nn.Module]]  # (name, block) in forward order
    head: Fn
    block_parts: list[BlockParts] | None = None  # how each block computes; None: from the block adapters


