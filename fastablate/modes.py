"""Module modes that engines set for a while and must restore."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(model: nn.Module, *, frozen: bool = False) -> Iterator[nn.Module]:
    """``model`` in eval mode (BatchNorm running statistics, no dropout) for the block; with
    ``frozen``, its parameters also need no gradient (attacks differentiate w.r.t. the input
    only). Both are restored afterwards, also on error."""
    was_training = model.training
    grads = [(p, p.requires_grad) for p in model.parameters()] if frozen else []
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, req in grads:
            p.requires_grad_(req)
        model.train(was_training)
