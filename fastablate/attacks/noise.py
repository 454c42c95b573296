"""The optimized-noise attack of robust-training studies: a perturbation found by Adam that raises
the log-probability of a wrong class while penalizing its squared L2 norm."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastablate.attacks.base import Attack, AttackOutput, check_inputs, frozen, output, succeeded, trace


def noise(model: nn.Module, x: Tensor, y: Tensor, *, steps: int = 100, lam: float = 0.01, lr: float = 0.01,
          target: Tensor | None = None, generator: torch.Generator | None = None) -> AttackOutput:
    """``steps`` Adam steps (learning rate ``lr``) on a perturbation ``delta`` that minimize
    ``-log p(wrong class) + lam * ||delta||_2^2``, the wrong class being the target or the most
    likely wrong one; an image leaves as soon as it is fooled. ``l2`` of the output is the norm
    it needed."""
    check_inputs(x, y, target)
    n = x.shape[0]
    delta = torch.zeros_like(x, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    best = x.clone()
    count = torch.zeros(n, dtype=torch.long, device=x.device)
    live = torch.ones(n, dtype=torch.bool, device=x.device)
    with frozen(model):
        for _ in range(steps):
            adv = (x + delta).clamp(0, 1)
            trace(adv[live], live.nonzero().squeeze(1))
            logits = model(adv)
            ok = succeeded(logits.detach(), y, target) & live
            best[ok] = adv.detach()[ok]
            live &= ~ok
            if not live.any():
                break
            wrong = target if target is not None else logits.detach().scatter(1, y[:, None], float("-inf")).argmax(1)
            logp = F.log_softmax(logits, 1).gather(1, wrong[:, None]).squeeze(1)
            loss = (-logp + lam * delta.flatten(1).pow(2).sum(1))[live].sum()
            opt.zero_grad()
            loss.backward()
            delta.grad[~live] = 0
            opt.step()
            count[live] += 1
    return output(x, best, ~live, count)


class Noise(Attack):
    """:func:`noise` as an object: ``Noise(model, lam=0.01)(images, labels)``."""

    function = staticmethod(noise)
