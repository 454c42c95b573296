"""Adversarial attacks: sparse pixels (L0), optimized Gaussian-like noise (L2), FGSM and PGD.

Every attack takes a batch of images in [0, 1] that the model classifies correctly and
returns adversarial images in [0, 1] and the number of gradient steps each used; it stops
working on an image as soon as the image is misclassified (or, with a target, classified
as the target).

- ``sparse``: white-box, gradient-guided, k pixels in all their channels (an L0 projected
  gradient method in the spirit of Croce & Hein 2019): a momentum score of margin gradients
  chooses the k pixels, which move by ``step * sign(score)`` from the original and are
  clamped, through ``fastablate.ops.sparse_pixel_update``; random restarts for the images
  not fooled yet; then a random-search finish (``queries``) for the images still not
  fooled. The result is checked: an image that differs from its original in more than k
  pixels, or leaves [0, 1], is an error, never a result.
- ``sparse-rs``: black-box, score-based (Sparse-RS, Croce et al. 2022): forward passes only,
  at most ``queries`` per image. k pixels set to corners of the colour cube; each iteration
  replaces a decaying fraction of them by random pixels with random corners and keeps the
  change when the margin improves (Sparse-RS's schedule and acceptance).
- ``sparse-ensemble``: the robust-accuracy evaluation of an L0 budget, in the spirit of
  sparse-AutoAttack: ``sparse`` (with its default finish), then ``sparse-rs`` with ``queries``
  on the images it leaves; an image counts as robust only when both fail, and the result
  names the share each attack fooled.
- ``noise``: the optimized-noise attack of robust-training studies: a perturbation found by
  Adam that raises the log-probability of a wrong class (the target, or the most likely
  wrong class) while penalizing ``lam * ||delta||_2^2``; the norm it needed is reported.
- ``fgsm`` (Goodfellow et al. 2015), ``pgd`` (L-inf) and ``pgd-l2`` (Madry et al. 2018),
  with a random start, as baselines.
"""
from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastablate.data import ImageSet
from fastablate.engines.core.distributed import all_sum, gather, is_main, merge, world
from fastablate.engines.core.protocol import Study
from fastablate.engines.core.runtime import Runtime, check_finite, hash_seed, model_name, my_batches, slug, table
from fastablate.engines.core.spec import Choice, Float, Int, Spec, Text, one_of, option
from fastablate.errors import FastablateError, note
from fastablate.models.checkpoint import atomic_save
from fastablate.modes import eval_mode, inference_copy
from fastablate.ops import sparse_pixel_update
from fastablate.plots import save, subplots

ATTACKS = ("sparse", "sparse-rs", "sparse-ensemble", "noise", "fgsm", "pgd", "pgd-l2")
# Attacks made of others, run in turn, each on the images the ones before it left.
ENSEMBLES = {"sparse-ensemble": ("sparse", "sparse-rs")}
DEFAULT_PIXELS = 0.005  # sparse budget: a fraction of the H*W pixels (5 of 32x32)
DEFAULT_STEPS = {"sparse": 30, "sparse-ensemble": 30, "noise": 100, "pgd": 20, "pgd-l2": 20}
# Forward passes per image of the random search (sparse-ensemble: of its sparse-rs).
DEFAULT_QUERIES = {"sparse": 300, "sparse-rs": 1000, "sparse-ensemble": 1000}
DEFAULT_EPS = {"pgd-l2": 0.5}  # others: 8/255 (L-inf)
SPARSE = ("sparse", "sparse-rs", "sparse-ensemble")
WHITE_BOX_SPARSE = ("sparse", "sparse-ensemble")  # the gradient steps of sparse
# The attacks each option means something to; giving it to another attack is an error.
APPLIES = {"pixels": SPARSE, "k": SPARSE, "queries": SPARSE,
           "restarts": WHITE_BOX_SPARSE, "lam": ("noise",), "lr": ("noise",),
           "eps": ("fgsm", "pgd", "pgd-l2"), "step": (*WHITE_BOX_SPARSE, "pgd", "pgd-l2"),
           "steps": (*WHITE_BOX_SPARSE, "noise", "pgd", "pgd-l2")}


@dataclass(frozen=True)
class AttackSpec(Spec):
    """An attack's options; a None is the attack's default (:meth:`resolved` fills it in)."""

    attack: str = option("sparse", "The attack.", type=Choice(*ATTACKS))
    pixels: Optional[float] = option(None, f"sparse attacks: budget as a fraction of the H*W pixels, e.g. 0.005 "
                                           f"(5 of 32x32) [default: {DEFAULT_PIXELS}].",
                                     type=Float(0, 1, min_open=True))
    k: Optional[int] = option(None, "sparse attacks: budget in pixels (instead of --pixels).", type=Int(min=1))
    queries: Optional[int] = option(None, "Forward passes per image of the random search: sparse-rs and "
                                          "sparse-ensemble's sparse-rs [default: "
                                          f"{DEFAULT_QUERIES['sparse-rs']}], sparse's finish for the images the "
                                          f"gradient steps leave [default: {DEFAULT_QUERIES['sparse']}; 0: none].",
                                    type=Int(min=0, max=10_000_000))
    steps: Optional[int] = option(None, "Gradient steps: per restart (sparse, sparse-ensemble) [default: 30], in "
                                        "all (noise [100], pgd, pgd-l2 [20]).", type=Int(min=1, max=1_000_000))
    restarts: int = option(1, "sparse, sparse-ensemble: starts of the pixel score per image (later ones random).",
                           type=Int(min=1, max=10_000))
    step: Optional[float] = option(None, "Step size [default: 1 (sparse, sparse-ensemble: to the corners of "
                                         "[0, 1]), eps/4 (pgd, pgd-l2)].", type=Float(0, 1e6, min_open=True))
    eps: Optional[float] = option(None, "fgsm, pgd: L-inf radius [default: 8/255]; pgd-l2: L2 radius "
                                        "[default: 0.5].", type=Float(0, 1e6, min_open=True))
    lam: float = option(0.01, "noise: weight of the squared L2 norm.", type=Float(0, 1e6))
    lr: float = option(0.01, "noise: Adam learning rate.", type=Float(0, 1e3, min_open=True))
    target: Optional[int] = option(None, "Targeted attack towards this class index.", type=Int(min=0))
    save_examples: bool = option(False, "Write adversarial.pt and plots/examples.png.")
    save_dataset: Optional[str] = option(None, "Write the successful adversarial examples (uint8, with their "
                                               "labels and indices in the split) to this file: training data "
                                               "(train --adv-data) and evaluation sets (--eval-sets).",
                                         type=Text("FILE"), role="output")
    save_trajectory: bool = option(False, "Record the attack step by step on the first 4 correctly classified "
                                          "images: trajectory.pt and plots/trajectory.png.")
    successes: Optional[int] = option(None, "Attack images in a seeded random order until this many are fooled "
                                            "(or the split runs out, which a note says); with --save-dataset, "
                                            "exactly these are saved.", type=Int(min=1))

    def validate(self) -> None:
        one_of(self, ("pixels", "k"), "set the pixel budget")
        if self.attack in ("sparse-rs", "sparse-ensemble") and self.queries == 0:
            raise FastablateError(f"--queries 0: the random search of {self.attack} needs at least 1 query per "
                                  "image (sparse takes 0: gradient steps only)")
        for name in self.given():
            attacks = APPLIES.get(name)
            if attacks is not None and self.attack not in attacks:
                raise FastablateError(f"{self.flag(name)} does not apply to --attack {self.attack} (it is for "
                                      f"{', '.join(attacks)})")

    def budget(self, image_size: int) -> int:
        """The sparse budget in pixels of an image_size x image_size image."""
        return self.k if self.k is not None else round((self.pixels or DEFAULT_PIXELS) * image_size * image_size)

    def resolved(self, image_size: int = 32) -> "AttackSpec":
        """Every default of this attack filled in: budget, steps, eps and step."""
        a = self.attack
        changes: dict = {"steps": self.steps or DEFAULT_STEPS[a]} if a in APPLIES["steps"] else {}
        if a in WHITE_BOX_SPARSE:
            changes.update(step=self.step or 1.0)
        if a in APPLIES["k"]:
            changes.update(k=self.budget(image_size), pixels=None,
                           queries=DEFAULT_QUERIES[a] if self.queries is None else self.queries)
        if a in APPLIES["eps"]:
            changes["eps"] = self.eps or DEFAULT_EPS.get(a, 8 / 255)
            if a in APPLIES["step"]:
                changes["step"] = self.step or changes["eps"] / 4
        return replace(self, **changes)

    def record(self, seed: int) -> dict:
        """The resolved options as results.json's ``spec`` records them."""
        return {"attack": self.attack, "k": self.k, "queries": self.queries, "steps": self.steps,
                "restarts": self.restarts, "step": self.step,
                "eps": self.eps, "lam": self.lam, "lr": self.lr, "target": self.target, "seed": seed}


_TRACE: ContextVar["Trajectory | None"] = ContextVar("fastablate_attack_trace", default=None)


def _trace(images, which: Tensor | None = None) -> None:
    """Report the current candidates of an attack's images ``which`` (default: all) to the
    :class:`Trajectory` recording, if any; ``images`` may be a function making them (made
    only while recording)."""
    rec = _TRACE.get()
    if rec is not None:
        rec.add(images() if callable(images) else images, which)


class Trajectory:
    """The images of one attack run, recorded after every update of the attack (gradient step
    or accepted random-search change): ``frames`` (T + 1, n, C, H, W) on the CPU, the first the
    originals."""

    def __init__(self, x: Tensor):
        self.state = x.detach().cpu().clone()
        self.frames = [self.state.clone()]

    def add(self, images: Tensor, which: Tensor | None) -> None:
        if which is None:
            self.state = images.detach().cpu().clone()
        else:
            self.state[which.cpu()] = images.detach().cpu()
        self.frames.append(self.state.clone())

    def record(self, fn, *args):
        """``fn(*args)`` with every update recorded; returns what ``fn`` returns."""
        token = _TRACE.set(self)
        try:
            return fn(*args)
        finally:
            _TRACE.reset(token)


class _Rows:
    """A recording seen through some rows of its images: what an attack on those rows reports
    as its image i lands in row ``rows[i]``."""

    def __init__(self, rec, rows: Tensor):
        self.rec, self.rows = rec, rows

    def add(self, images: Tensor, which: Tensor | None) -> None:
        self.rec.add(images, self.rows if which is None else self.rows[which.to(self.rows.device)])


def _on_rows(rows: Tensor, fn, *args):
    """``fn(*args)``, an attack on the images ``rows`` of the caller's, its updates recorded in
    those rows when the caller's are recorded."""
    rec = _TRACE.get()
    if rec is None:
        return fn(*args)
    token = _TRACE.set(_Rows(rec, rows))
    try:
        return fn(*args)
    finally:
        _TRACE.reset(token)


def margin(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """What the attack ascends, per image: untargeted, the best wrong logit minus the true one;
    targeted, the target's logit minus the best other one. Success is margin > 0."""
    cls = y if target is None else target
    own = logits.gather(1, cls[:, None]).squeeze(1)
    other = logits.scatter(1, cls[:, None], float("-inf")).amax(1)
    return other - own if target is None else own - other


def _search_score(logits: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
    """The random search's (score to raise, fooled) per image: untargeted, the margin;
    targeted, minus the cross-entropy of the target (Sparse-RS's targeted loss), which moves
    every other class, not only the best one."""
    m = margin(logits, y, target)
    if target is None:
        return m, m > 0
    return -F.cross_entropy(logits, target, reduction="none"), m > 0


def _succeeded(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    pred = logits.argmax(1)
    return pred != y if target is None else pred == target


def _check_target(y: Tensor, target: Tensor | None) -> None:
    if target is not None and (target == y).any():
        i = int((target == y).nonzero()[0])
        raise FastablateError(f"target class {int(target[i])} equals the label of image {i}: nothing to attack")


def _grad(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, loss: str = "margin"):
    x = x.detach().requires_grad_(True)
    logits = model(x)
    if loss == "margin":
        objective = margin(logits, y, target).sum()
    else:  # cross-entropy: away from y, or towards the target
        objective = F.cross_entropy(logits, y, reduction="sum") if target is None else \
            -F.cross_entropy(logits, target, reduction="sum")
    (g,) = torch.autograd.grad(objective, x)
    return g, logits.detach()


def sparse_attack(model: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec, target: Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Each step: accumulate the normalized margin gradient into a score ``u`` (momentum
    0.9), then make the candidate from the original image with the k pixels of largest
    sum over channels of |u| moved by ``step * sign(u)`` and clamped (one
    ``sparse_pixel_update``). The pixel set may change from step to step; every candidate
    differs from the original in at most k pixels. Restart 0 starts from u = 0, later
    restarts from a random u, for the images not fooled yet. With ``queries``, the images
    still not fooled get a random search (:func:`random_search`) that starts from the k
    pixels of largest final score and draws most replacements from the pixels the score
    ranks next, with the corners its signs point to."""
    _check_target(y, target)
    n = x.shape[0]
    spec = _sparse_spec(spec, x)
    best = x.clone()
    steps = torch.zeros(n, dtype=torch.long, device=x.device)
    todo = torch.arange(n, device=x.device)  # images not fooled yet
    for r in range(spec.restarts):
        if todo.numel() == 0:
            break
        xa, ya = x[todo], y[todo]
        ta = None if target is None else target[todo]
        u = torch.zeros_like(xa) if r == 0 else torch.randn(xa.shape, generator=generator).to(x.device) * 0.5
        cur, live = xa, torch.arange(todo.numel(), device=x.device)
        for s in range(spec.steps + 1):
            g, logits = _grad(model, cur, ya[live], None if ta is None else ta[live])
            if s > 0:  # cur is a candidate: keep the images it fools
                won = _succeeded(logits, ya[live], None if ta is None else ta[live])
                best[todo[live[won]]] = cur[won]
                live, g, u = live[~won], g[~won], u[~won]
                if live.numel() == 0 or s == spec.steps:
                    break
            u = MOMENTUM * u + g / g.abs().mean((1, 2, 3), keepdim=True).clamp_min(1e-12)
            cur, _ = sparse_pixel_update(xa[live], u, spec.k, spec.step)
            steps[todo[live]] += 1
            _trace(cur, todo[live])
        todo = todo[live]
    queries = torch.zeros_like(steps)
    if spec.queries and todo.numel():  # random search for the rest, guided by the last score
        ta = None if target is None else target[todo]
        guide = u.abs().sum(1).flatten(1), (u > 0).to(x.dtype).flatten(2).transpose(1, 2)
        adv, queries[todo] = _on_rows(todo, random_search, model, x[todo], y[todo], spec.k, spec.queries, ta,
                                      generator, guide)
        best[todo] = adv
    return _within_budget(best, x, spec), steps, queries


def _sparse_spec(spec: AttackSpec, x: Tensor) -> AttackSpec:
    """The resolved spec of a sparse attack on ``x``, its budget checked against the image."""
    h, w = x.shape[-2:]
    spec = spec.resolved(w)
    if not 1 <= spec.k <= h * w:
        raise FastablateError(f"{spec.attack} attack: k = {spec.k} pixels is not in 1..{h * w}")
    return spec


def _within_budget(best: Tensor, x: Tensor, spec: AttackSpec) -> Tensor:
    """``best``, checked to differ from ``x`` in at most k pixels and to stay in [0, 1]: a
    violation is an error, never a result."""
    changed = (best != x).any(1).flatten(1).sum(1)
    if (changed > spec.k).any() or best.min() < 0 or best.max() > 1:
        raise RuntimeError(f"{spec.attack} attack broke its budget: {int(changed.max())} pixels changed, "
                           f"k = {spec.k}, range [{best.min().item():.4f}, {best.max().item():.4f}]")
    return best


def noise_attack(model: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec, target: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    _check_target(y, target)
    spec = spec.resolved(x.shape[-1])
    n = x.shape[0]
    delta = torch.zeros_like(x, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=spec.lr)
    best = x.clone()
    steps = torch.zeros(n, dtype=torch.long, device=x.device)
    live = torch.ones(n, dtype=torch.bool, device=x.device)
    for _ in range(spec.steps):
        adv = (x + delta).clamp(0, 1)
        _trace(adv[live], live.nonzero().squeeze(1))
        logits = model(adv)
        ok = _succeeded(logits.detach(), y, target) & live
        best[ok] = adv.detach()[ok]
        live &= ~ok
        if not live.any():
            break
        wrong = target if target is not None else logits.detach().scatter(1, y[:, None], float("-inf")).argmax(1)
        logp = F.log_softmax(logits, 1).gather(1, wrong[:, None]).squeeze(1)
        loss = (-logp + spec.lam * delta.flatten(1).pow(2).sum(1))[live].sum()
        opt.zero_grad()
        loss.backward()
        delta.grad[~live] = 0
        opt.step()
        steps[live] += 1
    return best, steps, torch.zeros_like(steps)


def gradient_attack(model: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec, target: Tensor | None = None,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """FGSM (one step of eps), PGD L-inf or L2 (random start, ``spec.steps`` steps of ``spec.step``)."""
    _check_target(y, target)
    spec = spec.resolved(x.shape[-1])
    n = x.shape[0]
    view = (-1, 1, 1, 1)
    if spec.attack == "fgsm":
        g, _ = _grad(model, x, y, target, loss="ce")
        one = torch.ones(n, dtype=torch.long, device=x.device)
        adv = (x + spec.eps * g.sign()).clamp(0, 1)
        _trace(adv)
        return adv, one, torch.zeros_like(one)
    l2 = spec.attack == "pgd-l2"
    noise = torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1
    if l2:
        noise = noise / noise.flatten(1).norm(dim=1).view(view).clamp_min(1e-12) * spec.eps * 0.5
    adv = (x + noise * (1 if l2 else spec.eps)).clamp(0, 1)
    best = x.clone()
    steps = torch.zeros(n, dtype=torch.long, device=x.device)
    live = torch.ones(n, dtype=torch.bool, device=x.device)
    for _ in range(spec.steps):
        g, logits = _grad(model, adv, y, target, loss="ce")
        ok = _succeeded(logits, y, target) & live
        best[ok] = adv[ok]
        live &= ~ok
        if not live.any():
            break
        steps[live] += 1
        if l2:
            g = g / g.flatten(1).norm(dim=1).view(view).clamp_min(1e-12)
            d = adv + spec.step * g - x
            d = d * (spec.eps / d.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(view)
        else:
            d = (adv + spec.step * g.sign() - x).clamp(-spec.eps, spec.eps)
        adv = torch.where(live.view(view), (x + d).clamp(0, 1), adv)
        _trace(adv[live], live.nonzero().squeeze(1))
    with torch.no_grad():
        ok = _succeeded(model(adv), y, target) & live
    best[ok] = adv[ok]
    return best, steps, torch.zeros_like(steps)


# Sparse-RS's schedule of the share of the k pixels replaced per iteration, written for
# 10,000 queries: (iteration bound, divisor of the initial share); past the last bound, 20.
RS_SCHEDULE = ((0, 1), (50, 2), (200, 4), (500, 5), (1000, 6), (2000, 8), (4000, 10), (6000, 12), (8000, 15))
RS_SHARE = 0.3  # the initial share
RS_GUIDED = 0.7  # guided search: the chance that a replacement comes from the score's pool


def _rs_replaced(i: int, queries: int, k: int) -> int:
    """Pixels replaced by the ``i``-th trial (from 0; query ``i + 2`` of the image, after the
    start) of a search of ``queries`` queries: Sparse-RS's rule, the schedule rescaled to the
    budget and the share of k rounded down, at least one pixel."""
    t = int((i + 1) / max(queries, 1) * 10_000)
    divisor = next((d for bound, d in RS_SCHEDULE if t <= bound), 20)
    return max(1, int(RS_SHARE / divisor * k))


def set_pixels(x: Tensor, pix: Tensor, col: Tensor, *, owned: bool = False) -> Tensor:
    """``x`` (n, C, H, W) with the pixels ``pix`` (n, k; flat indices) set to ``col`` (n, k, C);
    ``owned``: ``x`` is a copy of the caller's own, written in place."""
    n, c, h, w = x.shape
    out = x.reshape(n, c, h * w) if owned else x.reshape(n, c, h * w).clone()
    out.scatter_(2, pix[:, None, :].expand(n, c, pix.shape[1]), col.transpose(1, 2).to(x.dtype))
    return out.view(n, c, h, w)


def _smallest(values: Tensor, m: int) -> Tensor:
    """Indices of the ``m`` smallest values of each row, smallest first (``argsort()[:, :m]``)."""
    return values.topk(m, dim=1, largest=False).indices


def random_search(model: nn.Module, x: Tensor, y: Tensor, k: int, queries: int, target: Tensor | None,
                  generator: torch.Generator | None,
                  guide: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Sparse-RS for L0 (Croce et al. 2022), forward passes only: k distinct pixels, each set to
    a corner of the colour cube; each iteration replaces a decaying number of them
    (:data:`RS_SCHEDULE`) by pixels outside the set with random corners (never the colour the
    pixel has: a pixel whose own colour is a corner gets one of the others), and keeps the
    change when the score (:func:`_search_score`: the margin, targeted the target's
    cross-entropy) improves or the image is fooled. At most ``queries`` forward passes per
    image; an image leaves the search when it is fooled. Returns the images (an image not fooled: its
    original) and the queries each used.

    ``guide`` (score (n, H*W), corner (n, H*W, C)) makes it guided: the search starts from
    the k pixels of largest score at their corners, and a replacement comes from the next
    pixels of the score (a pool of max(64, 8k)) with probability :data:`RS_GUIDED`, at the
    corner the guide gives. Random numbers come from ``generator`` on the CPU, so a seed
    gives the same search on every device."""
    n, c, h, w = x.shape
    area, dev = h * w, x.device
    rows = torch.arange(n)
    if guide is None:
        pix = _smallest(torch.rand(n, area, generator=generator), k)
        col = torch.randint(0, 2, (n, k, c), generator=generator).to(x.dtype)
        favour = corner = None
    else:
        score, corner = (t.detach().cpu() for t in guide)
        order = score.argsort(1, descending=True)
        pix = order[:, :k]
        col = corner[rows[:, None], pix]
        pool = min(area - k, max(64, 8 * k))
        favour = torch.ones(n, area)  # pool pixels come first with probability RS_GUIDED
        if pool > 0:
            favour[rows[:, None], order[:, k:k + pool]] = pool * (1 - RS_GUIDED) / (RS_GUIDED * (area - pool))
    own = x.detach().reshape(n, c, area).transpose(1, 2).cpu()  # (n, H*W, C): each pixel's colour
    bits = 1 << torch.arange(c)
    used = torch.ones(n, dtype=torch.long)
    with torch.no_grad():  # cur is updated in place below: not an inference tensor
        cur, fooled = (t.cpu() for t in _search_score(model(set_pixels(x, pix.to(dev), col.to(dev))), y, target))
    live = ~fooled
    for i in range(queries - 1):
        idx = live.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        b, m = idx.numel(), _rs_replaced(i, queries, k)
        p, q = pix[idx].clone(), col[idx].clone()
        draw = torch.rand(b, area, generator=generator)
        if favour is not None:
            draw *= favour[idx]
        draw[torch.arange(b)[:, None], p] = 2.0  # never a pixel of the set
        new = _smallest(draw, m)
        where = _smallest(torch.rand(b, k, generator=generator), m)
        colours = torch.randint(0, 2, (b, m, c), generator=generator).to(x.dtype)
        if corner is not None:
            keep = torch.rand(b, m, 1, generator=generator) < RS_GUIDED
            colours = torch.where(keep, corner[idx[:, None], new], colours)
        flip = (torch.randint(1, 1 << c, (b, m, 1), generator=generator) & bits) > 0  # another corner
        same = (colours == own[idx[:, None], new]).all(2, keepdim=True)
        colours = torch.where(same & flip, 1 - colours, colours)
        r = torch.arange(b)[:, None]
        p[r, where], q[r, where] = new, colours
        on = idx.to(dev)
        with torch.inference_mode():  # trial is only read
            trial, won = (t.cpu() for t in _search_score(model(set_pixels(x[on], p.to(dev), q.to(dev), owned=True)),
                                                         y[on], None if target is None else target[on]))
        used[idx] += 1
        better = (trial > cur[idx]) | won
        pix[idx[better]], col[idx[better]], cur[idx[better]] = p[better], q[better], trial[better]
        fooled[idx[better]] = won[better]
        _trace(lambda: set_pixels(x[idx.to(dev)], pix[idx].to(dev), col[idx].to(dev)), idx)
        live = ~fooled
    adv = set_pixels(x, pix.to(dev), col.to(dev))
    return torch.where(live.to(dev).view(-1, 1, 1, 1), x, adv), used.to(dev)


def sparse_rs_attack(model: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec, target: Tensor | None = None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Black-box Sparse-RS from a random start (:func:`random_search`); checked like sparse."""
    _check_target(y, target)
    spec = _sparse_spec(spec, x)
    best, queries = random_search(model, x, y, spec.k, spec.queries, target, generator)
    return _within_budget(best, x, spec), torch.zeros_like(queries), queries


def _part(spec: AttackSpec, attack: str) -> AttackSpec:
    """The spec of ``attack`` within the ensemble ``spec``: the options that apply to it, the
    rest at their defaults; the ensemble's queries go to its last attack."""
    last = attack == ENSEMBLES[spec.attack][-1]
    given = {n: getattr(spec, n) for n, attacks in APPLIES.items()
             if attack in attacks and spec.attack in attacks and (n != "queries" or last)}
    return AttackSpec(attack=attack, target=spec.target, **given)


def ensemble_attack(model: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec, target: Tensor | None = None,
                    generator: torch.Generator | None = None,
                    fooled_by: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The attacks of :data:`ENSEMBLES` in turn, each on the images the ones before it did not
    fool: an image resists only when every attack fails (robust accuracy is the minimum over
    them, per image). Steps and queries are summed over the attacks; ``fooled_by`` (n,), when
    given, gets the index of the attack that fooled each image (-1: none)."""
    best = x.clone()
    steps, queries = (torch.zeros(x.shape[0], dtype=torch.long, device=x.device) for _ in range(2))
    left = torch.arange(x.shape[0], device=x.device)
    for i, attack in enumerate(ENSEMBLES[spec.attack]):
        if left.numel() == 0:
            break
        t = None if target is None else target[left]
        adv, s, q = _on_rows(left, RUNNERS[attack], model, x[left], y[left], _part(spec, attack), t, generator)
        steps[left] += s
        queries[left] += q
        with torch.no_grad():
            won = _succeeded(model(adv), y[left], t)
        best[left[won]] = adv[won]
        if fooled_by is not None:
            fooled_by[left[won]] = i
        left = left[~won]
    return best, steps, queries


MOMENTUM = 0.9  # sparse: weight of the past in the pixel score

RUNNERS = {"sparse": sparse_attack, "sparse-rs": sparse_rs_attack, "sparse-ensemble": ensemble_attack,
           "noise": noise_attack, "fgsm": gradient_attack, "pgd": gradient_attack, "pgd-l2": gradient_attack}


EXAMPLE_KEYS = ("x", "x_adv", "y", "pred_adv", "attacked", "success", "index")
SAVED_FORMAT = "fastablate-adversarial-set"  # attack --save-dataset: successful examples only (version 2)


@dataclass
class AttackResult:
    model: str
    attack: str
    clean_accuracy: float
    robust_accuracy: float
    success_rate: float
    attacked: int
    images: int
    median_l0: float | None  # None when no image was fooled
    mean_l2: float | None
    steps_mean: float
    seconds_per_image: float
    skipped_target_class: int
    queries_mean: float | None = None  # sparse attacks: forward passes of the random search per attacked image
    k: int | None = None  # the sparse budget
    # An ensemble: per attack, the images it fooled ("fooled") and their share of the attacked ("share").
    parts: dict | None = None
    spec: dict = field(default_factory=dict)  # the resolved options
    examples: dict | None = field(default=None, repr=False)  # EXAMPLE_KEYS -> tensors, when kept
    trajectory: dict | None = field(default=None, repr=False)  # --save-trajectory (see trajectory())

    def summary(self) -> dict:
        """The figures of the result (results.csv's row)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("k", "parts", "spec", "examples", "trajectory")
                and not (k == "queries_mean" and v is None)}

    def to_dict(self) -> dict:
        return {**self.summary(), "k": self.k, **({"parts": self.parts} if self.parts else {}), "spec": self.spec}

    def rows(self) -> list[dict]:
        return [self.summary()]

    def plot(self, directory: Path, *others: "AttackResult") -> list[Path]:
        """plots/examples.png (examples-<model>.png for compared models) when examples were kept."""
        out = []
        for i, r in enumerate((self, *others)):
            suffix = "" if i == 0 else f"-{slug(r.model)}"
            if r.examples is not None:
                out.append(save_grid(r.examples, directory / f"examples{suffix}.png"))
            if r.trajectory is not None:
                out.append(plot_trajectory(r.trajectory, r.attack, directory / f"trajectory{suffix}.png"))
        return out


@dataclass
class Tally:
    """What the batches of one attack add up to (per process; summed over processes at the end)."""

    correct: int = 0  # images classified correctly
    fooled: int = 0
    attacked: int = 0
    skipped: int = 0  # correctly classified images of the target class
    seconds: float = 0.0  # in the attack itself
    l0s: list = field(default_factory=list)  # per fooled image
    l2s: list = field(default_factory=list)
    steps: list = field(default_factory=list)  # per attacked image
    queries: list = field(default_factory=list)
    parts: list = field(default_factory=list)  # an ensemble: images fooled by each of its attacks


def attack_batch(model: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec, gen: torch.Generator,
                 tally: Tally, copy: nn.Module | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Attack the correctly classified images of one batch (``spec`` resolved) and count them
    into ``tally``: (the batch with each fooled image replaced, attacked mask, fooled mask).
    The attack runs on ``copy`` (an :func:`~fastablate.modes.inference_copy` of ``model``;
    default ``model`` itself); which images are correct and which are fooled is ``model``'s
    answer."""
    with torch.no_grad():
        logits = model(x)
    check_finite(model, logits, x)
    ok = logits.argmax(1) == y
    tally.correct += int(ok.sum())
    if spec.target is not None:
        tally.skipped += int((ok & (y == spec.target)).sum())
        ok &= y != spec.target
    sel = ok.nonzero().squeeze(1)
    x_adv, success = x.clone(), torch.zeros_like(ok)
    if sel.numel():
        xs, ys = x[sel], y[sel]
        ts = None if spec.target is None else torch.full_like(ys, spec.target)
        parts = ENSEMBLES.get(spec.attack)
        extra = {} if parts is None else {"fooled_by": torch.full_like(ys, -1)}
        start = time.perf_counter()
        adv, steps, queries = RUNNERS[spec.attack](model if copy is None else copy, xs, ys, spec, ts, gen, **extra)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        tally.seconds += time.perf_counter() - start
        with torch.no_grad():
            won = _succeeded(model(adv), ys, ts)
        adv = torch.where(won.view(-1, 1, 1, 1), adv, xs)
        tally.attacked += sel.numel()
        tally.fooled += int(won.sum())
        diff = (adv - xs)[won]
        tally.l0s += (diff != 0).any(1).flatten(1).sum(1).tolist()
        tally.l2s += diff.flatten(1).norm(dim=1).tolist()
        tally.steps += steps.tolist()
        tally.queries += queries.tolist()
        if parts is not None:
            tally.parts = [a + int((extra["fooled_by"][won] == i).sum()) for i, a in enumerate(tally.parts)]
        x_adv[sel], success[sel] = adv, won
    return x_adv, ok, success


def run_attack(model: nn.Module, ds: ImageSet, spec: AttackSpec, runtime: Runtime, *,
               keep: bool = False) -> AttackResult:
    """Attack every correctly classified image of ``ds`` (not of the target class), batch by
    batch (:func:`attack_batch`), and sum the batches of every process.

    With ``keep``, the result's ``examples`` hold ``x``, ``x_adv``, ``y``, ``pred_adv``,
    ``attacked``, ``success`` and ``index`` (in ``ds``) for every image attacked or passed
    over (an image not attacked, or not fooled, keeps ``x_adv == x``). With
    ``spec.successes``, the images go in a seeded random order and the attack stops once that
    many are fooled.
    """
    if spec.target is not None and not 0 <= spec.target < ds.num_classes:
        raise FastablateError(f"--target {spec.target} is not a class of {ds.name} (0..{ds.num_classes - 1})")
    spec = spec.resolved(ds.image_size)
    t = Tally(parts=[0] * len(ENSEMBLES.get(spec.attack, ())))
    kept: list[tuple[int, dict[str, Tensor]]] = []  # (batch index, examples)
    name = model_name(model)
    source = torch.arange(len(ds))
    if spec.successes:  # every class in turn, not the first classes of a sorted split
        source = torch.randperm(len(ds), generator=torch.Generator().manual_seed(hash_seed(runtime.seed, "order")))
        ds = ds.subset(source)
    seen = 0
    with eval_mode(model, frozen=True):
        start = time.perf_counter()
        copy = inference_copy(model)
        t.seconds += time.perf_counter() - start  # part of the attack's time
        for i, x, y in my_batches(ds, runtime, f"{spec.attack} attack {name}"):
            # Each batch draws its own random numbers: the result of a batch does not depend on
            # the batches before it (or on which process runs it).
            gen = torch.Generator().manual_seed(hash_seed(runtime.seed, "attack", i))
            x_adv, ok, success = attack_batch(model, x, y, spec, gen, t, copy)
            index = source[i * runtime.batch_size:i * runtime.batch_size + x.shape[0]]  # i: the global batch
            seen += x.shape[0]
            if keep:
                with torch.no_grad():
                    pred_adv = model(x_adv).argmax(1)
                kept.append((i, {k: v.detach().cpu() for k, v in zip(EXAMPLE_KEYS, (x, x_adv, y, pred_adv, ok,
                                                                                       success, index))}))
            if spec.successes and t.fooled >= spec.successes:
                break
    if spec.successes and t.fooled < spec.successes:
        note(f"attack --successes {spec.successes}: the split ran out after {t.fooled} successful examples "
             f"({seen} images, {t.attacked} of them attacked)")
    correct, fooled, attacked, skipped = all_sum(torch.tensor([t.correct, t.fooled, t.attacked, t.skipped],
                                                              dtype=torch.int64)).tolist()
    seconds = all_sum(torch.tensor([t.seconds], dtype=torch.float64)).item()
    by_attack = None
    if spec.attack in ENSEMBLES:
        counts = all_sum(torch.tensor(t.parts, dtype=torch.int64)).tolist()
        by_attack = {a: {"fooled": c, "share": c / attacked if attacked else 0.0}
                     for a, c in zip(ENSEMBLES[spec.attack], counts)}
    l0s, l2s, steps_all, queries_all = ([v for part in gather(values) for v in part]
                                        for values in (t.l0s, t.l2s, t.steps, t.queries))
    examples = None
    if keep:
        parts = merge(kept)
        examples = {k: torch.cat([p[k] for p in parts]) for k in EXAMPLE_KEYS}
    n = seen if spec.successes else len(ds)
    return AttackResult(model=name, attack=spec.attack, clean_accuracy=correct / n,
                        robust_accuracy=(correct - fooled) / n, success_rate=fooled / attacked if attacked else 0.0,
                        attacked=attacked, images=n,
                        median_l0=float(torch.tensor(l0s, dtype=torch.float64).median()) if l0s else None,
                        mean_l2=sum(l2s) / len(l2s) if l2s else None,
                        steps_mean=sum(steps_all) / len(steps_all) if steps_all else 0.0,
                        seconds_per_image=seconds / attacked if attacked else 0.0, skipped_target_class=skipped,
                        queries_mean=(sum(queries_all) / len(queries_all) if queries_all else 0.0)
                        if spec.attack in APPLIES["queries"] else None,
                        k=spec.k if spec.attack in APPLIES["k"] else None, parts=by_attack,
                        spec=spec.record(runtime.seed),
                        examples=examples)


TRAJECTORY_IMAGES = 4


def trajectory(model: nn.Module, ds: ImageSet, spec: AttackSpec, runtime: Runtime) -> dict | None:
    """The attack on the first correctly classified image of each of the first
    TRAJECTORY_IMAGES classes met in ``ds``, every update recorded: ``frames`` (T + 1, n, C, H,
    W; the first the originals, the last what the attack returns), ``pred`` (T + 1, n) the
    model's class of each frame, ``y``, ``index`` (in ``ds``), ``classes``; None when no image
    is classified correctly."""
    spec = spec.resolved(ds.image_size)
    picked, labels, where = [], [], []
    with eval_mode(model, frozen=True), torch.no_grad():
        for i, x, y in my_batches(ds, runtime.with_(progress=False), ""):
            ok = (model(x).argmax(1) == y) & (y != spec.target if spec.target is not None else True)
            for j in ok.nonzero().squeeze(1).tolist():
                if int(y[j]) not in labels and len(picked) < TRAJECTORY_IMAGES:
                    picked.append(x[j])
                    labels.append(int(y[j]))
                    where.append(i * runtime.batch_size + j)
            if len(picked) == TRAJECTORY_IMAGES:
                break
    if not picked:
        return None
    x, y = torch.stack(picked), torch.tensor(labels, device=picked[0].device)
    target = None if spec.target is None else torch.full_like(y, spec.target)
    rec = Trajectory(x)
    gen = torch.Generator().manual_seed(hash_seed(runtime.seed, "trajectory"))
    with eval_mode(model, frozen=True):
        adv = rec.record(RUNNERS[spec.attack], model, x, y, spec, target, gen)[0]
    rec.add(adv, None)  # what the attack returns: the fooling candidate, or the original
    frames = torch.stack(rec.frames)
    with eval_mode(model), torch.no_grad():
        pred = torch.stack([model(f.to(x.device)).argmax(1).cpu() for f in frames])
    return {"frames": frames, "pred": pred, "y": y.cpu(), "index": torch.tensor(where), "classes": list(ds.classes)}


def plot_trajectory(traj: dict, attack: str, path: Path, columns: int = 8) -> Path:
    """Per image two rows: the image at evenly spaced updates of the attack (the last column
    what it returns), with the model's class, and the size of the perturbation per pixel, on one
    scale for the whole attack (its maximum in the row's label)."""
    frames, pred, classes = traj["frames"], traj["pred"], traj["classes"]
    t = frames.shape[0]
    cols = sorted(set(torch.linspace(0, t - 1, min(columns, t)).round().long().tolist()))
    n = frames.shape[1]
    change = (frames - frames[:1]).abs().mean(2)  # (T + 1, n, H, W): per pixel, over channels
    scale = change.flatten(2).amax(2).amax(0).clamp_min(1e-12)  # per image, over the whole attack
    fig, axes = subplots(2 * n, len(cols), figsize=(1.5 * len(cols) + 1, 3.0 * n), squeeze=False)
    for i in range(n):
        for c, step in enumerate(cols):
            img, d = frames[step, i], change[step, i] / scale[i]
            wrong = int(pred[step, i]) != int(traj["y"][i])
            top, bottom = axes[2 * i][c], axes[2 * i + 1][c]
            top.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            top.set_title(f"{'final' if step == t - 1 else f'update {step}'}\n{classes[int(pred[step, i])]}",
                          fontsize=7, color="tab:red" if wrong else "black")
            bottom.imshow(d.numpy(), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
        axes[2 * i][0].set_ylabel(f"image {int(traj['index'][i])}\n({classes[int(traj['y'][i])]})", fontsize=7)
        axes[2 * i + 1][0].set_ylabel(f"|perturbation|\n(max {float(scale[i]):.3g})", fontsize=7)
    fig.suptitle(f"{attack} attack, update by update (red: the model is fooled; the perturbation on one scale "
                 "per image)", fontsize=9)
    return save(fig, path, dpi=100)


def save_grid(examples: dict, path: Path, count: int = 8) -> Path:
    """PNG: one row per fooled image: original | adversarial | difference amplified to full range."""
    from torchvision.utils import save_image

    idx = examples["success"].nonzero().squeeze(1)[:count]
    if idx.numel() == 0:
        idx = torch.arange(min(count, examples["x"].shape[0]))
    x, adv = examples["x"][idx], examples["x_adv"][idx]
    d = (adv - x).abs()
    d = d / d.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    rows = torch.stack([x, adv, d], 1).flatten(0, 1)
    scale = max(1, 96 // rows.shape[-1])  # small images enlarged, pixel for pixel, so single pixels show
    save_image(F.interpolate(rows, scale_factor=scale, mode="nearest"), path, nrow=3, padding=2, pad_value=1.0)
    return path


class AttackStudy(Study):
    """Attack a checkpoint: sparse pixels (L0; white-box, black-box sparse-rs, or both in turn),
    optimized noise (L2), FGSM or PGD. Only images
    the model classifies correctly are attacked; success_rate is the fraction of them it fools."""

    name = "attack"
    command = "attack"
    spec_class = AttackSpec

    def check(self, models, data, spec):
        pixels = data.image_size * data.image_size
        k = spec.budget(data.image_size)
        if spec.attack in APPLIES["k"] and not 1 <= k <= pixels:
            raise FastablateError(
                f"--pixels {spec.pixels or DEFAULT_PIXELS:g} rounds to {k} pixels of {data.image_size}x"
                f"{data.image_size} images; give a larger fraction or --k" if spec.k is None else
                f"--k {k} is more than the {pixels} pixels of an image")
        if spec.target is not None and spec.target >= data.num_classes:
            raise FastablateError(f"--target {spec.target} is not a class of {data.name} (0..{data.num_classes - 1})")
        if spec.target is not None and bool((data.labels == spec.target).all()):
            raise FastablateError(f"--target {spec.target} equals the label of every image: nothing to attack")
        if spec.save_dataset and len(models) > 1:
            raise FastablateError("--save-dataset writes one model's adversarial set: give no --compare")
        if spec.successes and spec.successes > len(data):
            raise FastablateError(f"--successes {spec.successes}: the split holds {len(data)} images, so at most "
                                  f"{len(data)} can be fooled; ask for fewer")
        if spec.successes and world() > 1:
            raise FastablateError("--successes stops when enough images are fooled: run it in one process, not "
                                  "under torchrun")

    def run(self, model, data, spec, runtime):
        res = run_attack(model, data, spec, runtime, keep=spec.save_examples or bool(spec.save_dataset))
        ex = res.examples
        if spec.save_dataset and is_main():  # a file the user named: written as the CLI runs
            won = ex["success"].nonzero().squeeze(1)[:spec.successes]  # --successes: exactly that many
            atomic_save({"format": SAVED_FORMAT, "version": 2, "images": ex["x_adv"][won].mul(255).round().to(
                         torch.uint8), "labels": ex["y"][won], "index": ex["index"][won],
                         "classes": list(data.classes), "attack": res.spec, "model": res.model, "dataset": data.name,
                         "split": data.split, "images_seen": res.images, "attacked": res.attacked},
                        spec.save_dataset)
        if not spec.save_examples:
            res.examples = None  # kept for the dataset only: no grid
        if spec.save_trajectory:
            res.trajectory = trajectory(model, data, spec, runtime)
        return res

    def write_artifacts(self, results, spec, runtime):
        """adversarial.pt with --save-examples, trajectory.pt with --save-trajectory (-<model> for
        compared models)."""
        if not is_main():
            return
        for i, r in enumerate(results):
            suffix = "" if i == 0 else f"-{slug(r.model)}"
            if spec.save_examples:
                atomic_save(r.examples, runtime.with_(suffix=suffix).artifact("adversarial.pt"))
            if r.trajectory is not None:
                atomic_save(r.trajectory, runtime.with_(suffix=suffix).artifact("trajectory.pt"))

    def metrics(self, document: dict) -> dict[str, float]:
        return {k: document[k] for k in ("success_rate", "robust_accuracy", "clean_accuracy")}

    def report(self, results: Sequence[AttackResult], spec) -> str:
        out = [table([{k: v for k, v in r.summary().items()} for r in results])]
        for r in results:
            budget = f" at {r.k} pixels" if r.k is not None else ""
            out.append(f"{r.model}: {r.attack}{budget} fooled {r.success_rate:.4f} of {r.attacked} correctly "
                       f"classified images; robust accuracy {r.robust_accuracy:.4f} (clean {r.clean_accuracy:.4f})")
            if r.parts:
                out.append("  fooled by: " + ", then ".join(f"{a} {p['fooled']} ({p['share']:.4f})"
                                                           for a, p in r.parts.items()))
        return "\n".join(out)
