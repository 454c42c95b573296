"""Paths (Veit, Wilber, Belongie 2016, Sec. 6, Fig. 6): a ResNet of n residual units is an
ensemble of 2^n paths, C(n, k) of length k; the gradient that reaches the input through one
path shrinks with its length, so the paths that matter are short.

- Distribution: the number and fraction of paths of each length 0..n (exact integers).
- Gradient per length: the network runs forward as a whole (eval mode); backward, the
  gradient goes through the residual branch of k sampled units and through the shortcut of
  the others, i.e. along one path of length k. Loss: the summed cross-entropy of a sample's
  images with their labels; magnitude: the L2 norm of the gradient at each input image,
  averaged over the sample's images. The unit sets of one pass share its images: the
  forward pass runs once, and their gradients are stacked in one backward pass that takes
  each row through only the branch its set names (:func:`shared_gradients`); it equals
  building each masked network explicitly (tested).
- Contribution per length: paths x magnitude, normalized to sum to 1; the effective range
  is the shortest interval of lengths holding ``share`` (0.9) of it.
"""
from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastablate.data import ImageSet
from fastablate.engines.core import distributed as dist
from fastablate.engines.core.protocol import Study
from fastablate.engines.core.runtime import Runtime, default_max_memory, hash_seed, model_name, progress, table
from fastablate.engines.core.spec import Float, Int, List, Size, Spec, option
from fastablate.errors import FastablateError, note
from fastablate.modes import affine_batchnorm, eval_mode
from fastablate.plots import colors, save, subplots
from fastablate.units import UnitView, units


@dataclass(frozen=True)
class PathsSpec(Spec):
    samples: int = option(100, "Path samples (not images): the random unit sets drawn per path length, each "
                                   "a gradient over the --images images.", type=Int(min=1, max=1_000_000))
    lengths: Optional[tuple[int, ...]] = option(None, "Path lengths k to measure [default: 1..n].",
                                                type=List(Int(min=0)))
    images: int = option(8, "Training images per pass: the unit sets of a pass share them, each pass draws its own.",
                         type=Int(min=1, max=4096))
    sets: int = option(64, "Unit sets stacked in one pass: they share its images and its forward pass; the backward "
                           "pass holds sets x images rows.", type=Int(min=1, max=65536))
    max_memory: Optional[int] = option(None, "Gradient rows one backward pass may hold, e.g. 2G: the sets of a pass "
                                             "run in groups that fit, on the same images, with the same results "
                                             "[default: 1/4 of free RAM, 1/2 of free GPU].", type=Size())
    share: float = option(0.9, "Share of the total gradient contribution the effective range holds.",
                          type=Float(0, 1, min_open=True, max_open=True))


def residual_units(view: UnitView, name: str) -> list:
    """The units path analysis runs on: every unit must have a shortcut and a ReLU or no post."""
    res = view.residual()
    if not res:
        raise FastablateError(f"paths: {name} has no residual units (a plain net has one path only)")
    odd = [u.name for u in view.units if u.parts.shortcut is None or u.parts.post_kind == "custom"]
    if odd:
        raise FastablateError(f"paths: unit {odd[0]} of {name} has no shortcut (or a post-activation other than "
                              "ReLU); path analysis needs a network of residual units only")
    return res


def distribution(n: int) -> list[dict]:
    """Paths of each length 0..n: C(n, k) (exact) and its fraction of 2^n."""
    return [{"length": k, "paths": math.comb(n, k), "fraction": math.comb(n, k) / 2 ** n} for k in range(n + 1)]


def shared_gradients(view: UnitView, x: Tensor, y: Tensor, sets: Sequence[frozenset[int]]) -> Tensor:
    """Mean input-gradient norm of each of the M samples ``sets`` (the unit indices whose
    residual branch the gradient takes) on the same images ``x`` (B, C, H, W), ``y`` (B,).

    The forward pass does not depend on the path, so it runs once, keeping each branch's
    vector-Jacobian product; backward, the M gradients are stacked and each unit routes each
    row through its residual branch or its shortcut only (``torch.func.vmap`` over the
    branch's VJP, so a branch the row does not take costs nothing; across an identity
    shortcut a row stays where it is, uncopied). Samples whose sets agree on every unit above
    the current one carry the same gradient there and share one row.
    Run it under :func:`fastablate.modes.affine_batchnorm` (as the paths study does): the
    same values up to rounding, and eval-mode BatchNorm's VJP then batches without copies.
    """
    vjp_stem, saved, g = _forward(view, x, y)
    member = torch.tensor([[j in s for s in sets] for j in range(len(view.units))])
    row = torch.zeros(len(sets), dtype=torch.long)  # each sample's row of the stacked gradient
    g = g.unsqueeze(0)
    for j in reversed(range(len(view.units))):
        vjp_sc, vjp_res, positive = saved[j]
        if positive is not None:
            g.mul_(positive)  # g is always this function's own tensor
        takes = member[j]
        res, sc = row[takes].unique(), row[~takes].unique()  # the rows some sample routes each way
        if vjp_sc is None and not res.numel():
            continue  # no sample takes the branch: the identity shortcut passes every row unchanged
        if vjp_sc is None:
            # Identity shortcut: a row no sample routes through the branch stays where it is; a row
            # all its samples route through it is replaced; a row split between the two gets a new
            # row for its samples that take the branch.
            split = torch.isin(res, sc)
            both = bool(split.any())
            out = _through(vjp_res, g if len(res) == len(g) else g[res.to(g.device)])
            if both:  # the samples of split rows that take the branch move to the new rows
                where = torch.full((len(g),), -1, dtype=torch.long)
                where[res[split]] = torch.arange(len(g), len(g) + int(split.sum()))
                moved = takes & (where[row] >= 0)
                row[moved] = where[row[moved]]
                g.index_copy_(0, res[~split].to(g.device), out[(~split).to(g.device)])
                g = torch.cat([g, out[split.to(g.device)]])
            else:
                g = out if len(res) == len(g) else g.index_copy_(0, res.to(g.device), out)
        else:
            # Projection shortcut: the gradient changes shape; the rows through the branch first.
            parts = [_through(fn, g[rows.to(g.device)]) for rows, fn in ((res, vjp_res), (sc, vjp_sc)) if rows.numel()]
            g = torch.cat(parts)
            row = torch.where(takes, torch.searchsorted(res, row), len(res) + torch.searchsorted(sc, row))
    g = _through(vjp_stem, g)
    return g.flatten(2).norm(dim=2).mean(1)[row.to(g.device)]


def _forward(view: UnitView, x: Tensor, y: Tensor) -> tuple:
    """The forward pass, once: (the stem's VJP, each unit's (shortcut VJP or None for an identity,
    residual VJP, where its ReLU let through or None), the gradient of the summed cross-entropy at
    the last unit's output)."""
    from torch.func import vjp

    h, vjp_stem = vjp(view.stem, x.detach())
    saved = []
    for u in view.units:
        if isinstance(u.parts.shortcut, nn.Identity):
            sc, vjp_sc = h, None  # the gradient passes unchanged
        else:
            sc, vjp_sc = vjp(u.parts.shortcut, h)
        res, vjp_res = vjp(u.parts.residual, h)
        z = sc + res
        relu = u.parts.post_kind == "relu"
        h = torch.relu(z) if relu else z
        saved.append((vjp_sc, vjp_res, z > 0 if relu else None))
    logits, vjp_head = vjp(view.head, h)
    p = torch.softmax(_loss_precision(logits), 1)
    (g,) = vjp_head((p - F.one_hot(y, p.shape[1]).to(p.dtype)).to(logits.dtype))  # the summed cross-entropy's
    return vjp_stem, saved, g


def _loss_precision(logits: Tensor) -> Tensor:
    """Logits for the loss: float32 from half precision, float64 kept (a float64 run is the tests' oracle)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _through(fn, g: Tensor) -> Tensor:
    """The vector-Jacobian product ``fn`` of one forward pass applied to each row of ``g``."""
    from torch.func import vmap

    return vmap(lambda t: fn(t)[0])(g)


def naive_gradients(view: UnitView, x: Tensor, y: Tensor, sets: Sequence[frozenset[int]]) -> Tensor:
    """The reference: for each sample, the network with each unit's other branch detached,
    forward and backward on the images ``x`` (B, C, H, W), ``y`` (B,)."""
    out = []
    for s in sets:
        xi, yi = x.detach().requires_grad_(True), y
        h = view.stem(xi)
        for j, u in enumerate(view.units):
            sc, res = u.parts.shortcut(h), u.parts.residual(h)
            h = u.parts.apply_post(sc.detach() + res if j in s else sc + res.detach())
        loss = F.cross_entropy(_loss_precision(view.head(h)), yi, reduction="sum")
        (g,) = torch.autograd.grad(loss, xi)
        out.append(g.flatten(1).norm(dim=1).mean())
    return torch.stack(out)


def effective_range(shares: Sequence[float], share: float) -> tuple[int, int, float]:
    """The shortest interval [lo, hi] of lengths whose shares sum to at least ``share``
    (the one with the largest sum among the shortest), and that sum."""
    n = len(shares)
    best = (0, n - 1, sum(shares))
    for width in range(1, n + 1):
        found = [(lo, lo + width - 1, sum(shares[lo:lo + width])) for lo in range(n - width + 1)]
        found = [f for f in found if f[2] >= share - 1e-12]
        if found:
            best = max(found, key=lambda f: f[2])
            break
    return best


@dataclass
class PathsResult:
    model: str
    units: list[str]
    gradient: list[dict]  # length, mean, std, samples, q25, median, q75
    share: float
    seconds: float
    n_images: int
    distribution: list[dict] = field(default_factory=list)
    contribution: list[dict] = field(default_factory=list)
    effective: dict = field(default_factory=dict)
    central: dict = field(default_factory=dict)  # the shortest range of lengths holding 95% of the paths

    def __post_init__(self):
        n = len(self.units)
        self.distribution = distribution(n)
        measured = {g["length"]: g["mean"] for g in self.gradient}
        totals = {k: math.comb(n, k) * measured[k] for k in measured}
        z = sum(totals.values()) or 1.0
        self.contribution = [{"length": k, "share": totals[k] / z} for k in sorted(totals)]
        lengths = [c["length"] for c in self.contribution]
        lo, hi, got = effective_range([c["share"] for c in self.contribution], self.share)
        lo, hi = lengths[lo], lengths[hi]
        self.effective = {"lo": lo, "hi": hi, "share": got, "target_share": self.share,
                          "paths_fraction": sum(math.comb(n, k) for k in range(lo, hi + 1)) / 2 ** n,
                          "mean_path_length": n / 2,
                          "mean_effective_length": sum(c["length"] * c["share"] for c in self.contribution)}
        # Veit: 95% of the paths of a 54-unit net are 19-35 long; the shortest interval holding
        # at least 95% is 20-34 (0.960), which 19-35 (0.980) contains.
        clo, chi, held = effective_range([d["fraction"] for d in self.distribution], 0.95)
        self.central = {"lo": clo, "hi": chi, "share": held}

    def to_dict(self) -> dict:
        return {"model": self.model, "units": self.units, "n": len(self.units), "distribution": self.distribution,
                "gradient": self.gradient, "contribution": self.contribution, "effective": self.effective,
                "central_95": self.central,
                "loss": "sum over a sample's images of the cross-entropy with their labels",
                "norm": "L2 norm of the loss's gradient at each input image in [0, 1], mean over the sample's images",
                "images_per_sample": self.n_images, "seconds": self.seconds}

    def rows(self) -> list[dict]:
        grad = {g["length"]: g for g in self.gradient}
        share = {c["length"]: c["share"] for c in self.contribution}
        return [{"model": self.model, "length": d["length"], "paths": d["paths"], "fraction": d["fraction"],
                 "gradient_mean": grad.get(d["length"], {}).get("mean"),
                 "gradient_std": grad.get(d["length"], {}).get("std"),
                 "contribution": share.get(d["length"])} for d in self.distribution]

    def plot(self, directory: Path, *others: "PathsResult") -> list[Path]:
        return [plot_paths([self, *others], directory / "paths.png")]


def run_paths(model: nn.Module, ds: ImageSet, spec: PathsSpec, runtime: Runtime) -> PathsResult:
    """Gradient magnitude per path length over ``spec.samples`` samples per length."""
    start = time.perf_counter()
    name = model_name(model)
    view = units(model, (3, ds.image_size, ds.image_size))
    residual_units(view, name)
    n = len(view.units)
    lengths = list(spec.lengths) if spec.lengths else list(range(1, n + 1))
    rng = random.Random(f"{runtime.seed}:paths")
    work = [(k, frozenset(rng.sample(range(n), k))) for k in lengths for _ in range(spec.samples)]
    rng.shuffle(work)  # a pass mixes lengths, so each length's samples see many draws of images
    chunks = [work[i:i + spec.sets] for i in range(0, len(work), spec.sets)]
    group = sets_per_backward(view, spec, runtime.device, name)
    mine = [(c, chunk) for c, chunk in enumerate(chunks) if dist.mine(c)]
    measured = []  # (chunk index, [norm of each sample])
    with eval_mode(model, frozen=True), affine_batchnorm(model):
        for c, chunk in progress(mine, desc=f"paths {name}", enabled=runtime.progress):
            gen = torch.Generator().manual_seed(hash_seed(runtime.seed, "paths", c))  # the pass's own images
            idx = torch.randint(0, len(ds), (spec.images,), generator=gen)
            x = ds.floats(idx).to(runtime.device)
            y = ds.labels[idx].to(runtime.device)
            sets = [s for _, s in chunk]
            measured.append((c, [v for i in range(0, len(sets), group)
                                 for v in shared_gradients(view, x, y, sets[i:i + group]).tolist()]))
    norms: dict[int, list[float]] = {k: [] for k in lengths}
    for (k, _), v in zip(work, (v for part in dist.merge(measured) for v in part)):
        norms[k].append(v)
    gradient = []
    for k in lengths:
        vals = norms[k]
        mean = sum(vals) / len(vals)
        std = statistics.stdev(vals, mean) if len(vals) > 1 else None
        q25, median, q75 = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else vals * 3
        gradient.append({"length": k, "mean": mean, "std": std, "samples": len(vals), "q25": q25, "median": median,
                         "q75": q75})
    return PathsResult(name, view.names(), gradient, spec.share, time.perf_counter() - start, spec.images)


def sets_per_backward(view: UnitView, spec: PathsSpec, device: torch.device, name: str) -> int:
    """Sets of one pass that share a backward pass within ``--max-memory``: a stacked row holds
    the largest unit output of one image, about four times over (the gradient, its gathered
    rows, the branch's result and its intermediates); with a note when a pass must split."""
    row = 4 * 4 * spec.images * max(math.prod(u.out_shape) for u in view.units)
    limit = spec.max_memory or default_max_memory(device)
    group = max(1, min(spec.sets, limit // row))
    if group < spec.sets and dist.is_main():
        note(f"paths: {spec.sets} sets x {spec.images} images of {name} need about {spec.sets * row / 2**30:.2f} GiB "
             f"per backward pass, over the {limit / 2**30:.2f} GiB allowed (--max-memory): {group} sets per backward "
             "pass, on the same images, with the same results")
    return group


def plot_paths(results: Sequence[PathsResult], path: Path) -> Path:
    """Veit Fig. 6: (a) distribution of path lengths, (b) gradient magnitude per path length
    (log scale), (c) total contribution per length; one colour per model."""
    palette = colors()
    fig, (a, b, c) = subplots(1, 3, figsize=(14, 3.8))
    for r, col in zip(results, palette):
        a.plot([d["length"] for d in r.distribution], [d["fraction"] for d in r.distribution], "o-", ms=3, color=col,
               label=f"{r.model} (n={len(r.units)}): 95% in {r.central['lo']}-{r.central['hi']}")
        a.axvspan(r.central["lo"], r.central["hi"], color=col, alpha=0.08)
        ks = [g["length"] for g in r.gradient]
        b.plot(ks, [g["mean"] for g in r.gradient], "o-", ms=3, color=col, label=f"{r.model}: mean")
        b.fill_between(ks, [g["q25"] for g in r.gradient], [g["q75"] for g in r.gradient], color=col, alpha=0.2,
                       lw=0, label=f"{r.model}: 25-75% of the sets")
        c.plot([x["length"] for x in r.contribution], [x["share"] for x in r.contribution], "o-", ms=3, color=col,
               label=f"{r.model}: effective {r.effective['lo']}-{r.effective['hi']}")
        c.axvspan(r.effective["lo"], r.effective["hi"], color=col, alpha=0.12)
    a.set(xlabel="path length", ylabel="fraction of paths", title="(a) distribution of path lengths")
    b.set(xlabel="path length", ylabel="gradient magnitude at the input", yscale="log",
          title="(b) gradient per path length")
    c.set(xlabel="path length", ylabel="share of the total gradient", title="(c) total contribution per length")
    for ax in (a, b, c):
        ax.legend(fontsize=7)
    return save(fig, path, dpi=110)


class PathsStudy(Study):
    """Veit's unraveled view: path-length distribution, gradient magnitude per path length and
    the effective paths of a ResNet (on batches of training images)."""

    name = "paths"
    command = "paths"
    spec_class = PathsSpec
    setup_excludes = ("batch_size",)  # --sets x --images rows per pass
    setup_defaults = {"split": "train"}  # Veit measured on training images

    def load_models(self, setup, spec, data, runtime):
        """``--weights`` and the ``--compare`` models that have paths: a compared plain net (one
        path only) is left out with a note; a plain ``--weights`` model is an error (in check)."""
        models = super().load_models(setup, spec, data, runtime)
        kept = models[:1]
        for m in models[1:]:
            try:
                residual_units(units(m, (3, data.image_size, data.image_size)), model_name(m))
            except FastablateError as e:
                note(f"--compare {model_name(m)} left out: {str(e).removeprefix('paths: ')}")
                continue
            kept.append(m)
        return kept

    def check(self, models, data, spec):
        for m in models:
            view = units(m, (3, data.image_size, data.image_size))
            n = len(residual_units(view, model_name(m)))
            bad = [k for k in spec.lengths or () if k > n]
            if bad:
                raise FastablateError(f"--lengths: {model_name(m)} has {n} residual units, so a path length must be in "
                                      f"0..{n}, got {bad[0]}")

    def run(self, model, data, spec, runtime):
        return run_paths(model, data, spec, runtime)

    def metrics(self, document: dict) -> dict[str, float]:
        e = document["effective"]
        return {"effective_lo": e["lo"], "effective_hi": e["hi"], "mean_effective_length": e["mean_effective_length"]}

    def report(self, results: Sequence[PathsResult], spec) -> str:
        out = []
        for r in results:
            e = r.effective
            out.append(table([{"length": g["length"], "paths": f"{math.comb(len(r.units), g['length']):.3g}",
                               "gradient": f"{g['mean']:.3g}", "contribution": next(c["share"] for c in r.contribution
                                                                          if c["length"] == g["length"])}
                              for g in r.gradient]))
            out.append(f"{r.model}: {len(r.units)} residual units, 2^{len(r.units)} paths, {r.central['share']:.1%} "
                       f"of them {r.central['lo']}-{r.central['hi']} units long; effective paths "
                       f"{e['lo']}-{e['hi']} units long ({e['share']:.2f} of the gradient, {e['paths_fraction']:.4%} "
                       f"of all paths); mean path length {e['mean_path_length']:.1f}, mean effective length "
                       f"{e['mean_effective_length']:.1f}\n")
        return "\n".join(out)
