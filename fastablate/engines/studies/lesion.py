"""Lesion studies (Veit, Wilber, Belongie 2016): delete or reorder units at test time.

A *variant* is one altered model, written as a sequence of steps, one per position:
``(j, True)`` runs unit j there, ``(j, False)`` runs it lesioned (its shortcut alone).
Deletion variants keep unit i at position i; reorder variants permute same-shape units.

The executor runs many variants at once. Their hidden states are stacked along the batch
dimension, and variants that share a prefix of steps share its computation: at each
position the intact stream "forks" a lesioned copy, and the residual add of every copy
goes through one ``block_skip`` call. For ``all-single`` over n units this costs about
n^2/2 unit evaluations instead of the naive loop's n^2, and it gives the naive loop's
predictions, with logits within float32's tolerance (stacked passes run at other batch sizes,
where oneDNN may round differently; tested). Variants are run in chunks whose activations fit in
``max_memory``.
"""
from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastablate.data import ImageSet
from fastablate.engines.core.distributed import all_sum
from fastablate.engines.core.protocol import Study
from fastablate.engines.core.runtime import Runtime, check_finite, default_max_memory, model_name, my_batches, table
from fastablate.engines.core.spec import Int, List, Size, Spec, Value, applies, option
from fastablate.errors import FastablateError
from fastablate.modes import eval_mode
from fastablate.ops import block_skip
from fastablate.plots import colors, finish, subplots
from fastablate.units import UnitView, units

Step = tuple[int, bool]  # (unit index, run it: True / lesioned: False)


# --- plans -> variants ----------------------------------------------------------------------
PLANS = ("all-single", "k-random", "reorder", "units:NAME,NAME")


class Plan(Value):
    """One --lesion value; unit names are checked against the model later."""

    metavar = "PLAN"

    def parse(self, raw):
        return str(raw).strip()

    def problem(self, value):
        if value in PLANS[:3] or (isinstance(value, str) and value.startswith("units:")
                                  and all(value[len("units:"):].split(","))):
            return None
        return f"is not a plan; choose from: {', '.join(PLANS)}"


@dataclass(frozen=True)
class Variant:
    plan: str  # intact | all-single | k-random | units | reorder
    steps: tuple[Step, ...]
    deleted: tuple[str, ...] = ()  # names of the lesioned units
    order: tuple[str, ...] | None = None  # reorder: unit names in execution order
    tau: float | None = None  # reorder: Kendall's tau of the order against the original


def _deletion(view: UnitView, plan: str, deleted: Iterable[int]) -> Variant:
    drop = set(deleted)
    return Variant(plan, tuple((i, i not in drop) for i in range(len(view.units))),
                   tuple(view.units[i].name for i in sorted(drop)))


def kendall_tau(order: Sequence[int]) -> float:
    """Kendall's tau between ``order`` (a permutation of 0..n-1) and the identity."""
    n = len(order)
    if n < 2:
        return 1.0
    s = sum(1 if order[i] < order[j] else -1 for i in range(n) for j in range(i + 1, n))
    return s / (n * (n - 1) / 2)


def swappable_groups(view: UnitView) -> list[list[int]]:
    """Positions of units that keep their shape, grouped by that shape: any two in a group may swap."""
    groups: dict[tuple, list[int]] = {}
    for i, u in enumerate(view.units):
        if u.in_shape == u.out_shape:
            groups.setdefault(u.in_shape, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _reorders(view: UnitView, samples: int, rng: random.Random, model_name: str) -> list[Variant]:
    """``samples`` distinct orders, from one random swap of same-shape units up to many
    (Veit Fig. 5): sample s makes 1 + s * 2m / samples swaps, m = swappable units."""
    groups = swappable_groups(view)
    if not groups:
        raise FastablateError(f"--lesion reorder: {model_name} has no two units of the same shape to swap")
    m = sum(len(g) for g in groups)
    n = len(view.units)
    seen: set[tuple[int, ...]] = {tuple(range(n))}
    out: list[Variant] = []
    for _ in range(samples * 20):  # a model with few swappable units has fewer distinct orders
        if len(out) == samples:
            break
        order = list(range(n))
        for _ in range(1 + (len(out) * 2 * m) // samples):
            g = rng.choice([g for g in groups for _ in range(len(g))])  # weight groups by size
            a, b = rng.sample(g, 2)
            order[a], order[b] = order[b], order[a]
        if tuple(order) in seen:
            continue
        seen.add(tuple(order))
        out.append(Variant("reorder", tuple((j, True) for j in order),
                           order=tuple(view.units[j].name for j in order), tau=kendall_tau(order)))
    return out


def build_variants(view: UnitView, plans: Sequence[str], *, ks: Sequence[int] | None = None, samples: int = 20,
                   seed: int = 0, model_name: str = "model") -> list[Variant]:
    """The intact model followed by the variants of every plan, in plan order.

    ``k-random``: for each k in ``ks`` (default 1..n), ``samples`` distinct random sets of
    k lesionable units, or all C(n, k) sets when there are no more than ``samples``.
    """
    lesionable = [i for i, u in enumerate(view.units) if u.lesionable]
    index = {u.name: i for i, u in enumerate(view.units)}
    variants = [_deletion(view, "intact", ())]
    for plan in plans:
        problem = Plan().problem(plan)
        if problem:
            raise FastablateError(f"--lesion {plan!r}: {problem}")
        rng = random.Random(f"{seed}:{plan}")
        if plan == "all-single":
            if not lesionable:
                raise FastablateError(f"--lesion all-single: {model_name} has no lesionable unit")
            variants += [_deletion(view, plan, [i]) for i in lesionable]
        elif plan == "k-random":
            n = len(lesionable)
            for k in ks or range(1, n + 1):
                if not 1 <= k <= n:
                    raise FastablateError(f"--k {k}: {model_name} has {n} lesionable units, so k must be in 1..{n}")
                if math.comb(n, k) <= samples:
                    sets = list(itertools.combinations(lesionable, k))
                else:
                    chosen: set[tuple[int, ...]] = set()
                    while len(chosen) < samples:
                        chosen.add(tuple(sorted(rng.sample(lesionable, k))))
                    sets = sorted(chosen)
                variants += [_deletion(view, plan, s) for s in sets]
        elif plan == "reorder":
            variants += _reorders(view, samples, rng, model_name)
        else:
            names = plan[len("units:"):].split(",")
            for name in names:
                if name not in index:
                    raise FastablateError(f"--lesion {plan}: {model_name} has no unit {name!r}; "
                                          f"units are: {', '.join(view.names())}")
                u = view.units[index[name]]
                if not u.lesionable:
                    raise FastablateError(f"--lesion {plan}: unit {name} of {model_name} is not lesionable: {u.reason}")
            variants.append(_deletion(view, "units", [index[n] for n in names]))
    return variants


# --- the executor ---------------------------------------------------------------------------
def _rows(t: Tensor, groups: Sequence[int], batch: int) -> Tensor:
    """The stacked states of ``groups`` (each ``batch`` rows) of ``t``; a view when they are consecutive."""
    groups = list(groups)
    if groups == list(range(groups[0], groups[0] + len(groups))):
        return t.narrow(0, groups[0] * batch, len(groups) * batch)
    idx = torch.as_tensor(groups, device=t.device)
    return t.unflatten(0, (-1, batch)).index_select(0, idx).flatten(0, 1)


# Neighbouring segments are stacked into one batch up to these rows and bytes (CPU, CUDA). On a
# CPU a batch of a few hundred rows keeps the cores busy; larger stacks only add copies, and a
# stack over 16 MiB is fresh, page-faulted memory at every step.
STACK_LIMITS = ((256, 16 << 20), (8192, 1 << 40))


class LesionExecutor:
    """Runs the variants' step sequences on batches of images, sharing common prefixes."""

    def __init__(self, view: UnitView, step_lists: Sequence[tuple[Step, ...]], *, batch_size: int,
                 max_memory: int, elem_size: int = 4, stack_rows: int = STACK_LIMITS[0][0],
                 stack_bytes: int = STACK_LIMITS[0][1]):
        self.view = view
        self.stack_rows, self.stack_bytes = stack_rows, stack_bytes
        self.unique = sorted(set(step_lists))  # sorted: neighbours share the longest prefixes
        self.relu = [{"relu": True, "identity": False}.get(u.parts.post_kind) for u in view.units]
        in_bytes = [math.prod(u.in_shape) * elem_size for u in view.units]
        out_bytes = [math.prod(u.out_shape) * elem_size for u in view.units]

        def estimate(rows: list[int]) -> int:
            # Live at position d: the stacked inputs, and about four out-sized tensors per
            # output row (gathered shortcut, residual and its intermediates, result).
            return batch_size * max(((rows[d - 1] if d else 1) * in_bytes[d] + 4 * rows[d] * out_bytes[d])
                                    for d in range(len(rows))) if rows else 0

        self.chunks: list[list[int]] = []  # indices into self.unique
        self.peak_bytes = 0
        depth = len(view.units)
        prefixes: list[set] = [set() for _ in range(depth)]  # distinct prefixes of the open chunk
        for i, steps in enumerate(self.unique):
            rows = [len(p) + (steps[:d + 1] not in p) for d, p in enumerate(prefixes)]
            if self.chunks and estimate(rows) > max_memory:  # open a new chunk
                prefixes = [set() for _ in range(depth)]
                rows = [1] * depth
                self.chunks.append([])
            if not self.chunks:
                self.chunks.append([])
            self.chunks[-1].append(i)
            for d, p in enumerate(prefixes):
                p.add(steps[:d + 1])
            self.peak_bytes = max(self.peak_bytes, estimate(rows))

    def unit_evaluations(self) -> int:
        """Units run per image over all chunks (the naive loop runs len(unique) * n)."""
        total = 0
        for chunk in self.chunks:
            seqs = [self.unique[i] for i in chunk]
            total += sum(len({s[:d + 1] for s in seqs}) for d in range(len(seqs[0]))) if seqs else 0
        return total

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """Logits of every unique variant on ``x``: (len(unique), N, classes)."""
        return torch.cat([self._run(x, [self.unique[i] for i in chunk]) for chunk in self.chunks])

    def _run(self, x: Tensor, seqs: list[tuple[Step, ...]]) -> Tensor:
        b = x.shape[0]
        segments = [_Segment([list(range(len(seqs)))], self.view.stem(x))]
        for d in range(len(self.view.units)):
            segments = self._stack([child for seg in segments for child in self._advance(d, seg, b, seqs)], b)
        logits = None
        for seg in segments:
            out = self.view.head(seg.h).unflatten(0, (len(seg.groups), b))
            if logits is None:
                logits = out.new_empty((len(seqs), *out.shape[1:]))
            for i, vs in enumerate(seg.groups):  # one variant per group: the sequences are distinct
                logits[vs[0]] = out[i]
        return logits

    def _advance(self, d: int, seg: _Segment, b: int, seqs: list[tuple[Step, ...]]) -> list[_Segment]:
        """The segments after position d. A group that forks keeps its running child in place
        and sends its lesioned child to a new segment, so no stacked state is copied."""
        kids: list[dict[Step, list[int]]] = []  # per group: step -> variants taking it
        for members in seg.groups:
            by_step: dict[Step, list[int]] = {}
            for v in members:
                by_step.setdefault(seqs[v][d], []).append(v)
            kids.append(by_step)
        unit, relu = self.view.units[d], self.relu[d]
        run, skip = (d, True), (d, False)
        if unit.parts.shortcut is not None and relu is not None and all(k.keys() <= {run, skip} for k in kids):
            s = unit.parts.shortcut(seg.h)
            running = [g for g, k in enumerate(kids) if run in k]
            if not running:
                return [_Segment([k[skip] for k in kids], torch.relu(s) if relu else s)]
            r = unit.parts.residual(_rows(seg.h, running, b))
            keep = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
            index = None if len(running) == len(kids) else \
                (torch.as_tensor(running, device=s.device)[:, None] * b + torch.arange(b, device=s.device)).flatten()
            # Rows outside ``index`` take the shortcut alone: those groups' only child is lesioned.
            out = [_Segment([k.get(run) or k[skip] for k in kids], block_skip(s, r, keep, relu=relu, index=index))]
            forks = [g for g, k in enumerate(kids) if len(k) == 2]
            if forks:
                lesioned = _rows(s, forks, b)
                out.append(_Segment([kids[g][skip] for g in forks], torch.relu(lesioned) if relu else lesioned))
            return out
        by_step: dict[Step, list[tuple[int, list[int]]]] = {}
        for g, k in enumerate(kids):
            for step, vs in k.items():
                by_step.setdefault(step, []).append((g, vs))
        out = []
        for (j, runs), items in by_step.items():
            u, h = self.view.units[j], _rows(seg.h, [g for g, _ in items], b)
            out.append(_Segment([vs for _, vs in items], u(h) if runs else u.lesioned(h)))
        return out

    def _stack(self, segments: list[_Segment], b: int) -> list[_Segment]:
        """Concatenates neighbouring segments into stacks of up to ``stack_rows`` rows and
        ``stack_bytes`` bytes; a segment at either limit stays alone."""
        out: list[_Segment] = []
        pending: list[_Segment] = []

        def flush():
            if pending:
                out.append(pending[0] if len(pending) == 1 else
                           _Segment([g for p in pending for g in p.groups], torch.cat([p.h for p in pending])))
                pending.clear()

        def full(segs: list[_Segment]) -> bool:
            return (sum(p.h.shape[0] for p in segs) >= self.stack_rows
                    or sum(p.h.nbytes for p in segs) >= self.stack_bytes)
        for seg in segments:
            if full([seg]):
                out.append(seg)
                continue
            pending.append(seg)
            if full(pending):
                flush()
        flush()
        return out


@dataclass
class _Segment:
    """States of some variant groups, stacked: ``h`` holds ``len(groups)`` blocks of N rows."""

    groups: list[list[int]]  # the variants behind each block
    h: Tensor


def naive_logits(view: UnitView, variants: Sequence[Variant], x: Tensor) -> Tensor:
    """The reference: one altered model per variant, one at a time."""
    with torch.no_grad():
        return torch.stack([view.forward(x, lesion=v.deleted, order=v.order) for v in variants])


# --- the study ------------------------------------------------------------------------------
@dataclass
class LesionResult:
    model: str
    intact: dict
    variants: list[dict]
    unlesionable: list[dict]
    n: int
    seconds: float
    chunks: int
    unit_evaluations: int  # per image, all variants
    naive_unit_evaluations: int
    peak_activation_bytes: int  # the executor's estimate for one batch
    downsampling: list[str] = field(default_factory=list)  # units whose output shape differs from their input's

    def to_dict(self) -> dict:
        return {"model": self.model, "intact": self.intact, "variants": self.variants,
                "unlesionable": self.unlesionable, "downsampling_units": self.downsampling, "n": self.n,
                "seconds": self.seconds,
                "executor": {"chunks": self.chunks, "unit_evaluations_per_image": self.unit_evaluations,
                             "naive_unit_evaluations_per_image": self.naive_unit_evaluations,
                             "estimated_peak_activation_bytes": self.peak_activation_bytes}}

    def rows(self) -> list[dict]:
        return [{"model": self.model, "plan": v["plan"], "units": v["units"] if isinstance(v["units"], str)
                 else " ".join(v["units"]), "k": v["k"], "tau": v.get("tau", ""), "accuracy": v["accuracy"],
                 "loss": v["loss"], "mean_confidence": v["mean_confidence"], "delta": v["delta"]}
                for v in [{**self.intact, "plan": "intact", "units": "", "k": 0, "delta": 0.0}] + self.variants]

    def plot(self, directory: Path, *others: "LesionResult") -> list[Path]:
        return plot_lesion([self, *others], directory)


def run_lesion(model: nn.Module, ds: ImageSet, variants: Sequence[Variant], runtime: Runtime, *,
               view: UnitView | None = None, max_memory: int | None = None) -> LesionResult:
    """Accuracy, loss and mean confidence (softmax probability of the predicted class) of
    every variant over all of ``ds``; ``variants[0]`` must be the intact model."""
    start = time.perf_counter()
    device = runtime.device
    view = view or units(model, input_shape=(3, ds.image_size, ds.image_size))
    elem = next(model.parameters()).element_size()
    stack_rows, stack_bytes = STACK_LIMITS[device.type == "cuda"]
    ex = LesionExecutor(view, [v.steps for v in variants], batch_size=runtime.batch_size,
                        max_memory=max_memory or default_max_memory(device), elem_size=elem,
                        stack_rows=stack_rows, stack_bytes=stack_bytes)
    slot = {steps: i for i, steps in enumerate(ex.unique)}
    u = len(ex.unique)
    correct = torch.zeros(u, dtype=torch.float64)
    loss = torch.zeros(u, dtype=torch.float64)
    conf = torch.zeros(u, dtype=torch.float64)
    with eval_mode(model):
        for _, x, y in my_batches(ds, runtime, f"lesion {model_name(model)} ({u} variants)"):
            logits = ex(x)
            check_finite(model, logits[slot[variants[0].steps]], x)
            logp = F.log_softmax(logits.float(), dim=-1)  # (variants, N, classes)
            top, pred = logp.max(-1)
            correct += (pred == y).sum(1).double().cpu()
            loss -= logp.gather(2, y.expand(u, -1).unsqueeze(2)).squeeze(2).sum(1).double().cpu()
            conf += top.exp().sum(1).double().cpu()
    for t in (correct, loss, conf):
        all_sum(t)
    n = len(ds)

    def metrics(v: Variant) -> dict:
        i = slot[v.steps]
        return {"accuracy": correct[i].item() / n, "loss": loss[i].item() / n, "mean_confidence": conf[i].item() / n}

    intact = metrics(variants[0])
    rows = []
    for v in variants[1:]:
        m = metrics(v)
        row = {"plan": v.plan, "units": list(v.order) if v.order is not None else list(v.deleted),
               "k": len(v.deleted), **m, "delta": m["accuracy"] - intact["accuracy"]}
        if v.tau is not None:
            row["tau"] = v.tau
        rows.append(row)
    return LesionResult(model=model_name(model), intact=intact, variants=rows,
                        unlesionable=[{"unit": x.name, "reason": x.reason} for x in view.units if not x.lesionable],
                        n=n, seconds=time.perf_counter() - start, chunks=len(ex.chunks),
                        unit_evaluations=ex.unit_evaluations(), naive_unit_evaluations=u * len(view.units),
                        peak_activation_bytes=ex.peak_bytes,
                        downsampling=[x.name for x in view.units if x.in_shape != x.out_shape])


def summary(res: LesionResult) -> list[dict]:
    """One row per single/explicit variant, per k of k-random, and for all reorders together."""
    rows = [{"model": res.model, "variant": "intact", "accuracy": res.intact["accuracy"], "delta": 0.0, "spread": ""}]
    by_k: dict[int, list[float]] = {}
    taus, reorder_acc = [], []
    for v in res.variants:
        if v["plan"] == "k-random":
            by_k.setdefault(v["k"], []).append(v["accuracy"])
        elif v["plan"] == "reorder":
            taus.append(v["tau"])
            reorder_acc.append(v["accuracy"])
        else:
            rows.append({"model": res.model, "variant": f"{v['plan']} {','.join(v['units'])}",
                         "accuracy": v["accuracy"], "delta": v["delta"], "spread": ""})
    for k, accs in sorted(by_k.items()):
        mean = sum(accs) / len(accs)
        rows.append({"model": res.model, "variant": f"k-random k={k} ({len(accs)} sets)", "accuracy": mean,
                     "delta": mean - res.intact["accuracy"], "spread": f"{min(accs):.4f}..{max(accs):.4f}"})
    if reorder_acc:
        mean = sum(reorder_acc) / len(reorder_acc)
        rows.append({"model": res.model, "variant": f"reorder ({len(reorder_acc)} orders, tau "
                     f"{min(taus):.2f}..{max(taus):.2f})", "accuracy": mean, "delta": mean - res.intact["accuracy"],
                     "spread": f"{min(reorder_acc):.4f}..{max(reorder_acc):.4f}"})
    return rows


def plot_lesion(results: Sequence[LesionResult], directory: Path) -> list[Path]:
    """Veit Figs. 3-5 for each plan present: error per deleted unit (units that change the shape,
    where Veit's errors jump, marked), error vs number of deleted units (mean and min-max),
    error vs Kendall's tau. One series per model."""
    palette = colors()
    paths = []
    singles = [[v for v in r.variants if v["plan"] == "all-single"] for r in results]
    if any(singles):
        names: list[str] = []
        for vs in singles:
            names += [v["units"][0] for v in vs if v["units"][0] not in names]
        fig, ax = subplots(figsize=(max(6.0, 0.3 * len(names) + 2), 4))
        for r, vs, c in zip(results, singles, palette):
            err = {v["units"][0]: 1 - v["accuracy"] for v in vs}  # a gap where this model's unit is not lesionable
            ax.plot(range(len(names)), [err.get(n, math.nan) for n in names], "o-", ms=4, color=c,
                    label=f"{r.model}, one unit deleted")
            down = [i for i, n in enumerate(names) if n in r.downsampling and n in err]
            ax.plot(down, [err[names[i]] for i in down], "s", ms=9, mfc="none", mec=c,
                    label=f"{r.model}: unit that downsamples")
            ax.axhline(1 - r.intact["accuracy"], ls="--", color=c, label=f"{r.model} intact")
        ax.set_xticks(range(len(names)), names, rotation=90)
        paths.append(finish(fig, ax, directory / "lesion-single.png", ylabel="error",
                            title="Deleting one unit at test time", ylim=(0, 1.02)))
    krand = [[v for v in r.variants if v["plan"] == "k-random"] for r in results]
    if any(krand):
        fig, ax = subplots(figsize=(6, 4))
        for r, vs, c in zip(results, krand, palette):
            by_k: dict[int, list[float]] = {0: [1 - r.intact["accuracy"]]}
            for v in vs:
                by_k.setdefault(v["k"], []).append(1 - v["accuracy"])
            ks = sorted(by_k)
            mean = [sum(by_k[k]) / len(by_k[k]) for k in ks]
            ax.fill_between(ks, [min(by_k[k]) for k in ks], [max(by_k[k]) for k in ks], color=c, alpha=0.2)
            ax.plot(ks, mean, "o-", color=c, label=f"{r.model} (mean, min-max)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        paths.append(finish(fig, ax, directory / "lesion-k-random.png", xlabel="number of deleted units k",
                            ylabel="error", title="Deleting k random units", ylim=(0, 1.02)))
    reorders = [[v for v in r.variants if v["plan"] == "reorder"] for r in results]
    if any(reorders):
        fig, ax = subplots(figsize=(6, 4))
        for r, vs, c in zip(results, reorders, palette):
            ax.scatter([1.0] + [v["tau"] for v in vs], [1 - r.intact["accuracy"]] + [1 - v["accuracy"] for v in vs],
                       color=c, s=14, label=r.model)
        ax.invert_xaxis()
        paths.append(finish(fig, ax, directory / "lesion-reorder.png", xlabel="Kendall's tau of the unit order",
                            ylabel="error", title="Reordering units", ylim=(0, 1.02)))
    return paths



# --- the study ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LesionSpec(Spec):
    plans: tuple[str, ...] = option((), "Lesion study (repeatable): all-single | k-random | reorder | units:NAME,NAME.",
                                    type=Plan(), flag="--lesion", multiple=True)
    ks: Optional[tuple[int, ...]] = option(None, "k-random: numbers of deleted units, e.g. 1,2,4 [default: 1..all].",
                                           type=List(Int(min=1)), flag="--k")
    samples: int = option(20, "Lesion samples (not images): the random unit sets per k (k-random) and the random "
                                  "orders (reorder).", type=Int(min=1, max=100_000))
    max_memory: Optional[int] = option(None, "Activations per chunk of variants, e.g. 2G "
                                             "[default: 1/4 of free RAM, 1/2 of free GPU].", type=Size())

    def validate(self) -> None:
        applies(self, "ks", "k-random" in self.plans, "--lesion k-random, which is not given")
        applies(self, "samples", bool({"k-random", "reorder"} & set(self.plans)),
                "--lesion k-random and reorder, neither of which is given")


class LesionStudy(Study):
    """Lesion study (Veit et al. 2016): units deleted or reordered at test time, every variant
    evaluated on the same images."""

    name = "lesion"
    command = "eval"
    spec_class = LesionSpec
    triggers = ("plans",)

    def variants(self, model: nn.Module, ds: ImageSet, spec: LesionSpec, seed: int) -> tuple[UnitView, list[Variant]]:
        view = units(model, (3, ds.image_size, ds.image_size))
        return view, build_variants(view, spec.plans, ks=spec.ks, samples=spec.samples, seed=seed,
                                    model_name=model_name(model))

    def check(self, models, data, spec):
        for m in models:  # an impossible plan for any model fails before anything is written
            self.variants(m, data, spec, 0)

    def run(self, model, data, spec, runtime):
        view, variants = self.variants(model, data, spec, runtime.seed)
        return run_lesion(model, data, variants, runtime, view=view, max_memory=spec.max_memory)

    def document(self, results, spec):
        return {"plans": list(spec.plans), **super().document(results, spec)}

    def metrics(self, document: dict) -> dict[str, float]:
        out = {"intact_accuracy": document["intact"]["accuracy"]}
        for plan in dict.fromkeys(v["plan"] for v in document["variants"]):
            accs = [v["accuracy"] for v in document["variants"] if v["plan"] == plan]
            out[f"{plan}_mean_accuracy"] = sum(accs) / len(accs)
        return out

    def report(self, results: Sequence[LesionResult], spec) -> str:
        out = []
        for r in results:
            out.append(table(summary(r)))
            if r.unlesionable:
                out.append("not lesionable: " + "; ".join(f"{u['unit']} ({u['reason']})" for u in r.unlesionable))
            out.append(f"{r.model}: {len(r.variants)} variants on {r.n} images in {r.seconds:.1f}s "
                       f"({r.unit_evaluations / r.naive_unit_evaluations:.2f} of the naive loop's unit evaluations)\n")
        return "\n".join(out)
