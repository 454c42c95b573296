"""The attack study: every correctly classified image of a split attacked, batch by batch, with
an attack of :mod:`fastablate.attacks` (sparse pixels, Sparse-RS, their ensemble, optimized
noise, FGSM, PGD), on an inference copy of the model (BatchNorm folded, channels-last); the
tally of successes, L0/L2, steps, queries and time; the adversarial examples, the saved set
of successes (``--save-dataset``) and an attack recorded update by update
(``--save-trajectory``). The figures: :mod:`fastablate.engines.studies.attack_plots`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from fastablate.attacks import ATTACKS, Trajectory, takers
from fastablate.attacks.base import succeeded
from fastablate.data import ImageSet
from fastablate.engines.core.attack_options import AttackOptions, ResolvedAttack
from fastablate.engines.core.distributed import all_sum, gather, is_main, merge, world
from fastablate.engines.core.protocol import Study
from fastablate.engines.core.runtime import Runtime, check_finite, hash_seed, model_name, my_batches, slug, table
from fastablate.engines.core.spec import Int, Text, option
from fastablate.engines.studies.attack_plots import plot_trajectory, save_grid
from fastablate.errors import FastablateError, note
from fastablate.files import atomic_save
from fastablate.modes import eval_mode, inference_copy


@dataclass(frozen=True)
class AttackSpec(AttackOptions):
    """The attack study's options: the attack's (:class:`AttackOptions`), then what it writes."""

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


def attack_batch(model: nn.Module, x: Tensor, y: Tensor, spec: ResolvedAttack, gen: torch.Generator,
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
        start = time.perf_counter()
        out = spec.run(model if copy is None else copy, xs, ys, ts, gen)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        tally.seconds += time.perf_counter() - start
        adv = out.x_adv
        with torch.no_grad():  # fooled or not: the model's own answer, not its copy's
            won = succeeded(model(adv), ys, ts)
        adv = torch.where(won.view(-1, 1, 1, 1), adv, xs)
        tally.attacked += sel.numel()
        tally.fooled += int(won.sum())
        diff = (adv - xs)[won]
        tally.l0s += (diff != 0).any(1).flatten(1).sum(1).tolist()
        tally.l2s += diff.flatten(1).norm(dim=1).tolist()
        tally.steps += out.steps.tolist()
        tally.queries += out.queries.tolist()
        if out.fooled_by is not None:
            tally.parts = [a + int((out.fooled_by[won] == i).sum()) for i, a in enumerate(tally.parts)]
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
    options, spec = spec, spec.resolved(ds.image_size)
    t = Tally(parts=[0] * len(ATTACKS[spec.attack].parts))
    kept: list[tuple[int, dict[str, Tensor]]] = []  # (batch index, examples)
    name = model_name(model)
    source = torch.arange(len(ds))
    if options.successes:  # every class in turn, not the first classes of a sorted split
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
            if options.successes and t.fooled >= options.successes:
                break
    if options.successes and t.fooled < options.successes:
        note(f"attack --successes {options.successes}: the split ran out after {t.fooled} successful examples "
             f"({seen} images, {t.attacked} of them attacked)")
    examples = None
    if keep:
        parts = merge(kept)
        examples = {k: torch.cat([p[k] for p in parts]) for k in EXAMPLE_KEYS}
    return summed(t, name, spec, seen if options.successes else len(ds), runtime.seed, examples)


def summed(t: Tally, name: str, spec: ResolvedAttack, n: int, seed: int, examples: dict | None) -> AttackResult:
    """The result of the tallies of every process over ``n`` images."""
    correct, fooled, attacked, skipped = all_sum(torch.tensor([t.correct, t.fooled, t.attacked, t.skipped],
                                                              dtype=torch.int64)).tolist()
    seconds = all_sum(torch.tensor([t.seconds], dtype=torch.float64)).item()
    by_attack = None
    if ATTACKS[spec.attack].parts:
        counts = all_sum(torch.tensor(t.parts, dtype=torch.int64)).tolist()
        by_attack = {a: {"fooled": c, "share": c / attacked if attacked else 0.0}
                     for a, c in zip(ATTACKS[spec.attack].parts, counts)}
    l0s, l2s, steps_all, queries_all = ([v for part in gather(values) for v in part]
                                        for values in (t.l0s, t.l2s, t.steps, t.queries))
    return AttackResult(model=name, attack=spec.attack, clean_accuracy=correct / n,
                        robust_accuracy=(correct - fooled) / n, success_rate=fooled / attacked if attacked else 0.0,
                        attacked=attacked, images=n,
                        median_l0=float(torch.tensor(l0s, dtype=torch.float64).median()) if l0s else None,
                        mean_l2=sum(l2s) / len(l2s) if l2s else None,
                        steps_mean=sum(steps_all) / len(steps_all) if steps_all else 0.0,
                        seconds_per_image=seconds / attacked if attacked else 0.0, skipped_target_class=skipped,
                        queries_mean=(sum(queries_all) / len(queries_all) if queries_all else 0.0)
                        if spec.attack in takers("queries") else None,
                        k=spec.k, parts=by_attack, spec=spec.record(seed), examples=examples)


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
        adv = rec.record(spec.run, model, x, y, target, gen).x_adv
    rec.add(adv, None)  # what the attack returns: the fooling candidate, or the original
    frames = torch.stack(rec.frames)
    with eval_mode(model), torch.no_grad():
        pred = torch.stack([model(f.to(x.device)).argmax(1).cpu() for f in frames])
    return {"frames": frames, "pred": pred, "y": y.cpu(), "index": torch.tensor(where), "classes": list(ds.classes)}


class AttackStudy(Study):
    """Attack a checkpoint: sparse pixels (L0; white-box, black-box sparse-rs, or both in turn),
    optimized noise (L2), FGSM or PGD. Only images
    the model classifies correctly are attacked; success_rate is the fraction of them it fools."""

    name = "attack"
    command = "attack"
    spec_class = AttackSpec

    def check(self, models, data, spec):
        spec.check_budget(data.image_size)
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
