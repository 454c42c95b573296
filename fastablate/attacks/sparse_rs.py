"""Sparse-RS for L0 (Croce et al. 2022, "Sparse-RS: a versatile framework for query-efficient
sparse black-box adversarial attacks"): forward passes only, at most ``queries`` per image."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastablate.attacks.base import (Attack, AttackOutput, check_budget, check_inputs, frozen, margin, output, trace,
                                     within_budget)
from fastablate.errors import FastablateError

# Sparse-RS's schedule of the share of the k pixels replaced per iteration, written for
# 10,000 queries: (iteration bound, divisor of the initial share); past the last bound, 20.
RS_SCHEDULE = ((0, 1), (50, 2), (200, 4), (500, 5), (1000, 6), (2000, 8), (4000, 10), (6000, 12), (8000, 15))
RS_SHARE = 0.3  # the initial share
RS_GUIDED = 0.7  # guided search: the chance that a replacement comes from the score's pool


def rs_replaced(i: int, queries: int, k: int) -> int:
    """Pixels replaced by the ``i``-th trial (from 0; query ``i + 2`` of the image, after the
    start) of a search of ``queries`` queries: Sparse-RS's rule, the schedule rescaled to the
    budget and the share of k rounded down, at least one pixel."""
    t = int((i + 1) / max(queries, 1) * 10_000)
    divisor = next((d for bound, d in RS_SCHEDULE if t <= bound), 20)
    return max(1, int(RS_SHARE / divisor * k))


def search_score(logits: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
    """The random search's (score to raise, fooled) per image: untargeted, the margin;
    targeted, minus the cross-entropy of the target (Sparse-RS's targeted loss), which moves
    every other class, not only the best one."""
    m = margin(logits, y, target)
    if target is None:
        return m, m > 0
    return -F.cross_entropy(logits, target, reduction="none"), m > 0


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
                  guide: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Sparse-RS for L0 (Croce et al. 2022), forward passes only: k distinct pixels, each set to
    a corner of the colour cube; each iteration replaces a decaying number of them
    (:data:`RS_SCHEDULE`) by pixels outside the set with random corners (never the colour the
    pixel has: a pixel whose own colour is a corner gets one of the others), and keeps the
    change when the score (:func:`search_score`: the margin, targeted the target's
    cross-entropy) improves or the image is fooled. At most ``queries`` forward passes per
    image; an image leaves the search when it is fooled. Returns the images (an image not
    fooled: its original), whether each was fooled, and the queries each used.

    ``guide`` (score (n, H*W), corner (n, H*W, C)) makes it guided: the search starts from
    the k pixels of largest score at their corners, and a replacement comes from the next
    pixels of the score (a pool of max(64, 8k)) with probability :data:`RS_GUIDED`, at the
    corner the guide gives. Random numbers come from ``generator`` on the CPU, so a seed
    gives the same search on every device."""
    n, c, h, w = x.shape
    area, dev = h * w, x.device
    pix, col, favour, corner = _start(n, c, area, k, x.dtype, generator, guide)
    own = x.detach().reshape(n, c, area).transpose(1, 2).cpu()  # (n, H*W, C): each pixel's colour
    used = torch.ones(n, dtype=torch.long)
    with torch.no_grad():  # cur is updated in place below: not an inference tensor
        cur, fooled = (t.cpu() for t in search_score(model(set_pixels(x, pix.to(dev), col.to(dev))), y, target))
    live = ~fooled
    for i in range(queries - 1):
        idx = live.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        p, q = _propose(pix[idx], col[idx], own[idx], rs_replaced(i, queries, k), generator,
                        None if favour is None else favour[idx], None if corner is None else corner[idx])
        on = idx.to(dev)
        with torch.inference_mode():  # trial is only read
            trial, won = (t.cpu() for t in search_score(model(set_pixels(x[on], p.to(dev), q.to(dev), owned=True)),
                                                        y[on], None if target is None else target[on]))
        used[idx] += 1
        better = (trial > cur[idx]) | won
        pix[idx[better]], col[idx[better]], cur[idx[better]] = p[better], q[better], trial[better]
        fooled[idx[better]] = won[better]
        trace(lambda: set_pixels(x[idx.to(dev)], pix[idx].to(dev), col[idx].to(dev)), idx)
        live = ~fooled
    adv = set_pixels(x, pix.to(dev), col.to(dev))
    return torch.where(live.to(dev).view(-1, 1, 1, 1), x, adv), fooled.to(dev), used.to(dev)


def _start(n: int, c: int, area: int, k: int, dtype: torch.dtype, generator: torch.Generator | None,
           guide: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The search's start (pixels (n, k), corners (n, k, C)) and, guided, the weights that favour
    the score's pool and the corner of every pixel (see :func:`random_search`)."""
    if guide is None:
        pix = _smallest(torch.rand(n, area, generator=generator), k)
        return pix, torch.randint(0, 2, (n, k, c), generator=generator).to(dtype), None, None
    rows = torch.arange(n)
    score, corner = (t.detach().cpu() for t in guide)
    order = score.argsort(1, descending=True)
    pix = order[:, :k]
    pool = min(area - k, max(64, 8 * k))
    favour = torch.ones(n, area)  # pool pixels come first with probability RS_GUIDED
    if pool > 0:
        favour[rows[:, None], order[:, k:k + pool]] = pool * (1 - RS_GUIDED) / (RS_GUIDED * (area - pool))
    return pix, corner[rows[:, None], pix], favour, corner


def _propose(pix: Tensor, col: Tensor, own: Tensor, m: int, generator: torch.Generator | None,
             favour: Tensor | None, corner: Tensor | None) -> tuple[Tensor, Tensor]:
    """A trial of each image: ``m`` of its k pixels replaced by pixels outside the set, at random
    corners (guided: from the pool and at the guide's corner, mostly), never a pixel's own colour."""
    (b, k), c = pix.shape, col.shape[2]
    p, q = pix.clone(), col.clone()
    draw = torch.rand(b, own.shape[1], generator=generator)
    if favour is not None:
        draw *= favour
    draw[torch.arange(b)[:, None], p] = 2.0  # never a pixel of the set
    new = _smallest(draw, m)
    where = _smallest(torch.rand(b, k, generator=generator), m)
    colours = torch.randint(0, 2, (b, m, c), generator=generator).to(col.dtype)
    if corner is not None:
        keep = torch.rand(b, m, 1, generator=generator) < RS_GUIDED
        colours = torch.where(keep, corner[torch.arange(b)[:, None], new], colours)
    flip = (torch.randint(1, 1 << c, (b, m, 1), generator=generator) & (1 << torch.arange(c))) > 0  # another corner
    same = (colours == own[torch.arange(b)[:, None], new]).all(2, keepdim=True)
    colours = torch.where(same & flip, 1 - colours, colours)
    r = torch.arange(b)[:, None]
    p[r, where], q[r, where] = new, colours
    return p, q


def sparse_rs(model: nn.Module, x: Tensor, y: Tensor, *, k: int, queries: int = 1000, target: Tensor | None = None,
              generator: torch.Generator | None = None) -> AttackOutput:
    """Black-box Sparse-RS from a random start (:func:`random_search`): ``k`` pixels in all their
    channels, at most ``queries`` forward passes per image; the result checked to change at most k
    pixels and stay in [0, 1]."""
    check_inputs(x, y, target)
    check_budget("sparse-rs", k, *x.shape[-2:])
    if queries < 1:
        raise FastablateError(f"sparse-rs attack: queries = {queries}; the random search needs at least 1 per image")
    with frozen(model):
        best, fooled, queries_used = random_search(model, x, y, k, queries, target, generator)
    return output(x, within_budget("sparse-rs", best, x, k), fooled, torch.zeros_like(queries_used), queries_used)


class SparseRS(Attack):
    """:func:`sparse_rs` as an object: ``SparseRS(model, k=5, queries=1000)(images, labels)``."""

    function = staticmethod(sparse_rs)
