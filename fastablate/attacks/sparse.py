"""A white-box, gradient-guided L0 attack on k pixels in all their channels (an L0 projected
gradient method in the spirit of Croce & Hein 2019, "Sparse and imperceivable adversarial
attacks"), finished by a guided Sparse-RS search."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastablate.attacks.base import (Attack, AttackOutput, check_budget, check_inputs, frozen, input_gradient,
                                     on_rows, output, succeeded, trace, within_budget)
from fastablate.attacks.sparse_rs import random_search
from fastablate.ops import sparse_pixel_update

MOMENTUM = 0.9  # weight of the past in the pixel score


def sparse(model: nn.Module, x: Tensor, y: Tensor, *, k: int, steps: int = 30, restarts: int = 1, step: float = 1.0,
           queries: int = 300, target: Tensor | None = None,
           generator: torch.Generator | None = None) -> AttackOutput:
    """Each step: accumulate the normalized margin gradient into a score ``u`` (momentum 0.9),
    then make the candidate from the original image with the k pixels of largest sum over
    channels of |u| moved by ``step * sign(u)`` and clamped (one ``sparse_pixel_update``; the
    default step takes a pixel to a corner of [0, 1]). The pixel set may change from step to
    step; every candidate differs from the original in at most k pixels. Restart 0 starts from
    u = 0, later ones (``restarts``) from a random u, for the images not fooled yet. ``queries``
    forward passes per image of a random search (:func:`random_search`) then finish the images
    still not fooled: it starts from the k pixels of largest final score and draws most
    replacements from the pixels the score ranks next, with the corners its signs point to (0:
    gradient steps only)."""
    check_inputs(x, y, target)
    check_budget("sparse", k, *x.shape[-2:])
    n = x.shape[0]
    best = x.clone()
    won_any = torch.zeros(n, dtype=torch.bool, device=x.device)
    step_count = torch.zeros(n, dtype=torch.long, device=x.device)
    todo = torch.arange(n, device=x.device)  # images not fooled yet
    with frozen(model):
        for r in range(restarts):
            if todo.numel() == 0:
                break
            xa, ya = x[todo], y[todo]
            ta = None if target is None else target[todo]
            u = torch.zeros_like(xa) if r == 0 else torch.randn(xa.shape, generator=generator).to(x.device) * 0.5
            cur, live = xa, torch.arange(todo.numel(), device=x.device)
            for s in range(steps + 1):
                g, logits = input_gradient(model, cur, ya[live], None if ta is None else ta[live])
                if s > 0:  # cur is a candidate: keep the images it fools
                    won = succeeded(logits, ya[live], None if ta is None else ta[live])
                    best[todo[live[won]]] = cur[won]
                    won_any[todo[live[won]]] = True
                    live, g, u = live[~won], g[~won], u[~won]
                    if live.numel() == 0 or s == steps:
                        break
                u = MOMENTUM * u + g / g.abs().mean((1, 2, 3), keepdim=True).clamp_min(1e-12)
                cur, _ = sparse_pixel_update(xa[live], u, k, step)
                step_count[todo[live]] += 1
                trace(cur, todo[live])
            todo = todo[live]
        used = torch.zeros_like(step_count)
        if queries and todo.numel():  # random search for the rest, guided by the last score
            ta = None if target is None else target[todo]
            guide = u.abs().sum(1).flatten(1), (u > 0).to(x.dtype).flatten(2).transpose(1, 2)
            adv, won_any[todo], used[todo] = on_rows(todo, random_search, model, x[todo], y[todo], k, queries, ta,
                                                     generator, guide)
            best[todo] = adv
    return output(x, within_budget("sparse", best, x, k), won_any, step_count, used)


class Sparse(Attack):
    """:func:`sparse` as an object: ``Sparse(model, k=5)(images, labels)``."""

    function = staticmethod(sparse)
