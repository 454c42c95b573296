"""FGSM (Goodfellow et al. 2015) and PGD in L-inf and L2 (Madry et al. 2018), with a random
start: the gradient baselines."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastablate.attacks.base import Attack, AttackOutput, check_inputs, frozen, input_gradient, output, succeeded, trace
from fastablate.errors import FastablateError

VIEW = (-1, 1, 1, 1)


def _positive(name: str, value: float, attack: str) -> None:
    if not value > 0:
        raise FastablateError(f"{attack} attack: {name} = {value}; it must be positive")


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, target: Tensor | None = None,
         generator: torch.Generator | None = None) -> AttackOutput:
    """One step of ``eps`` (L-inf) along the sign of the cross-entropy's gradient."""
    check_inputs(x, y, target)
    _positive("eps", eps, "fgsm")
    with frozen(model):
        g, _ = input_gradient(model, x, y, target, loss="ce")
        adv = (x + eps * g.sign()).clamp(0, 1)
        trace(adv)
        with torch.no_grad():
            won = succeeded(model(adv), y, target)
    # The stepped images, fooling or not (adversarial training takes them all)
    one = torch.ones(x.shape[0], dtype=torch.long, device=x.device)
    return output(x, adv, won, one)


def pgd(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 8 / 255, steps: int = 20, step: float | None = None,
        target: Tensor | None = None, generator: torch.Generator | None = None) -> AttackOutput:
    """PGD in L-inf: a random start in the ``eps`` ball, ``steps`` steps of ``step`` (default eps/4)
    along the gradient's sign, each projected back into the ball and [0, 1]."""
    return _pgd(model, x, y, eps, steps, step, target, generator, l2=False)


def pgd_l2(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 0.5, steps: int = 20, step: float | None = None,
           target: Tensor | None = None, generator: torch.Generator | None = None) -> AttackOutput:
    """PGD in L2: as :func:`pgd` in the L2 ball of radius ``eps``, the steps along the normalized
    gradient."""
    return _pgd(model, x, y, eps, steps, step, target, generator, l2=True)


def _pgd(model, x, y, eps, steps, step, target, generator, *, l2: bool) -> AttackOutput:
    name = "pgd-l2" if l2 else "pgd"
    check_inputs(x, y, target)
    _positive("eps", eps, name)
    step = eps / 4 if step is None else step
    _positive("step", step, name)
    n = x.shape[0]
    noise = torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1
    if l2:
        noise = noise / noise.flatten(1).norm(dim=1).view(VIEW).clamp_min(1e-12) * eps * 0.5
    adv = (x + noise * (1 if l2 else eps)).clamp(0, 1)
    best = x.clone()
    count = torch.zeros(n, dtype=torch.long, device=x.device)
    live = torch.ones(n, dtype=torch.bool, device=x.device)
    with frozen(model):
        for _ in range(steps):
            g, logits = input_gradient(model, adv, y, target, loss="ce")
            ok = succeeded(logits, y, target) & live
            best[ok] = adv[ok]
            live &= ~ok
            if not live.any():
                break
            count[live] += 1
            if l2:
                g = g / g.flatten(1).norm(dim=1).view(VIEW).clamp_min(1e-12)
                d = adv + step * g - x
                d = d * (eps / d.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(VIEW)
            else:
                d = (adv + step * g.sign() - x).clamp(-eps, eps)
            adv = torch.where(live.view(VIEW), (x + d).clamp(0, 1), adv)
            trace(adv[live], live.nonzero().squeeze(1))
        with torch.no_grad():
            ok = succeeded(model(adv), y, target) & live
    best[ok] = adv[ok]
    return output(x, best, ~live | ok, count)


class FGSM(Attack):
    """:func:`fgsm` as an object: ``FGSM(model, eps=8/255)(images, labels)``."""

    function = staticmethod(fgsm)


class PGD(Attack):
    """:func:`pgd` as an object: ``PGD(model, eps=8/255, steps=20)(images, labels)``."""

    function = staticmethod(pgd)


class PGDL2(Attack):
    """:func:`pgd_l2` as an object: ``PGDL2(model, eps=0.5)(images, labels)``."""

    function = staticmethod(pgd_l2)
