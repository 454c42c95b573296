"""Attacks in turn, each on the images the ones before it left: an image resists only when every
attack fails, so robust accuracy is the minimum over them, image by image (the evaluation of
sparse-AutoAttack, Croce et al. 2022)."""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fastablate.attacks.base import Attack, AttackOutput, check_inputs, frozen, on_rows, output, succeeded
from fastablate.attacks.sparse import sparse
from fastablate.attacks.sparse_rs import sparse_rs
from fastablate.errors import FastablateError


def ensemble(model: nn.Module, x: Tensor, y: Tensor, *, attacks: Sequence[Callable[..., AttackOutput]],
             target: Tensor | None = None, generator: torch.Generator | None = None) -> AttackOutput:
    """The ``attacks`` (functions of this package with their options bound, e.g.
    ``functools.partial(attacks.sparse, k=5)``) in turn, each on the images the ones before it
    did not fool, as judged by ``model``. Steps and queries are summed over them; ``fooled_by``
    names the attack that fooled each image (its index, -1: none)."""
    check_inputs(x, y, target)
    if not attacks:
        raise FastablateError("ensemble: give at least one attack")
    n = x.shape[0]
    best = x.clone()
    steps, queries = (torch.zeros(n, dtype=torch.long, device=x.device) for _ in range(2))
    fooled_by = torch.full((n,), -1, dtype=torch.long, device=x.device)
    left = torch.arange(n, device=x.device)
    with frozen(model):
        for i, attack in enumerate(attacks):
            if left.numel() == 0:
                break
            t = None if target is None else target[left]
            part = on_rows(left, attack, model, x[left], y[left], target=t, generator=generator)
            steps[left] += part.steps
            queries[left] += part.queries
            with torch.no_grad():
                won = succeeded(model(part.x_adv), y[left], t)
            best[left[won]] = part.x_adv[won]
            fooled_by[left[won]] = i
            left = left[~won]
    return output(x, best, fooled_by >= 0, steps, queries, fooled_by)


def sparse_ensemble(model: nn.Module, x: Tensor, y: Tensor, *, k: int, steps: int = 30, restarts: int = 1,
                    step: float = 1.0, queries: int = 1000, target: Tensor | None = None,
                    generator: torch.Generator | None = None) -> AttackOutput:
    """The robust accuracy of an L0 budget of ``k`` pixels: :func:`sparse` (with its gradient
    options and its own random-search finish), then :func:`sparse_rs` with ``queries`` on the
    images it leaves."""
    return ensemble(model, x, y, attacks=[partial(sparse, k=k, steps=steps, restarts=restarts, step=step),
                                          partial(sparse_rs, k=k, queries=queries)], target=target,
                    generator=generator)


class SparseEnsemble(Attack):
    """:func:`sparse_ensemble` as an object: ``SparseEnsemble(model, k=5)(images, labels)``."""

    function = staticmethod(sparse_ensemble)
