"""The training loop: schedule, optimizer, weight averaging, adversarial batches, per-epoch
evaluation, checkpoints and resume. The options live in :class:`~fastablate.engines.studies.train.TrainSpec`.

Recipe pieces (each an option): SGD with Nesterov momentum, no weight decay on BatchNorm and
biases; a cosine schedule or a one-cycle (linear rise over ``warmup`` of the steps, linear
fall to zero: Smith & Topin 2019, as in Page's "How to train your ResNet"); label smoothing;
an exponential moving average of the weights (``ema``: the average is what is evaluated and
saved, as in airbench); test-time flip averaging (``tta``); channels-last memory.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastablate.data import ImageSet
from fastablate.data.augment import augment
from fastablate.engines.core import distributed as dist
from fastablate.engines.core.runtime import Runtime, batch_progress, hash_seed
from fastablate.engines.studies.evaluation import EvalResult, evaluate
from fastablate.errors import FastablateError, note
from fastablate.models import save_checkpoint
from fastablate.files import atomic_save
from fastablate.models.transfer import keep_frozen_bn
from fastablate.modes import eval_mode
from fastablate.plots import save, subplots
from fastablate.rundir import write_csv

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --precision: the dtype autocast computes in
STATE_FILE = "last.pt"  # optimizer, schedule, averaged weights and RNG state for --resume
MODEL_FILE = "model.pt"  # the model in our checkpoint format


def learning_rate(spec, batch_size: int, step: int, total: int) -> float:
    """The learning rate at ``step`` of ``total``: --lr per 128 images, scaled with the global
    batch (``--lr-scaling none``: as given)."""
    base = spec.base_lr() * (batch_size * dist.world() / 128 if spec.lr_scaling == "linear" else 1.0)
    if spec.schedule == "onecycle":
        rise = max(1, round(spec.warmup * total))
        return base * (step + 1) / rise if step < rise else base * (total - step) / max(1, total - rise)
    return base * 0.5 * (1 + math.cos(math.pi * step / total))


class WeightAverage:
    """An exponential moving average of a model's parameters (its buffers are copied), with
    the usual warm-up of the decay: min(decay, (1 + t) / (10 + t)) at step t."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval()
        self.decay, self.steps = decay, 0
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for a, p in zip(self.model.parameters(), model.parameters()):
            a.lerp_(p.detach(), 1 - d)
        for a, b in zip(self.model.buffers(), model.buffers()):
            a.copy_(b)
        self.steps += 1


DIVERGING = 100  # a loss this many times its first-epoch value: the training is diverging


def divergence_warning(history: list[dict]) -> str | None:
    """A line for the first epoch whose train or test loss is over DIVERGING times its
    first-epoch value (the run goes on: a lower --lr is the user's call), or None."""
    for row in history[1:]:
        for key in ("val_loss" if "val_loss" in history[0] else "test_loss", "train_loss"):
            first, now = history[0][key], row[key]
            if now > DIVERGING * first:
                return (f"training is diverging: the {key.replace('_', ' ')} at epoch {row['epoch']} is {now:.3g}, "
                        f"over {DIVERGING} times its first-epoch {first:.3g}; lower --lr")
    return None


def _saved_batches(ds: ImageSet, size: int, gen: torch.Generator, augments, device) -> Tensor:
    """``size`` random images of ``ds`` (with replacement), augmented like the training batch."""
    idx = torch.randint(0, len(ds), (size,), generator=gen)
    x = ds.floats(idx).to(device)
    return (augment(x, augments, gen) if augments else x), ds.labels[idx].to(device)


@dataclass
class Loop:
    """What every epoch of one training uses."""

    model: nn.Module
    forward: nn.Module  # the model, or its DistributedDataParallel wrapper under torchrun
    opt: torch.optim.Optimizer
    average: WeightAverage | None  # --ema
    scaler: torch.amp.GradScaler  # --precision fp16 (a no-op otherwise)
    fmt: torch.memory_format
    steps_per_epoch: int
    total: int  # steps of the whole training (the schedule's length)

    @property
    def trained(self) -> nn.Module:
        """What is evaluated and saved: the weight average with --ema, else the model."""
        return self.average.model if self.average is not None else self.model

    def state(self, epoch: int, data, keeper: "Keeper", history: list[dict]) -> dict:
        """last.pt: what --resume continues from."""
        avg = self.average
        return {"arch": self.model.arch, "epoch": epoch, "state_dict": self.model.net.state_dict(),
                "optimizer": self.opt.state_dict(), "fingerprint": data.fingerprint,
                "average": avg.model.net.state_dict() if avg else None, "average_steps": avg.steps if avg else 0,
                "best": keeper.state(), "torch_rng": torch.get_rng_state(), "scaler": self.scaler.state_dict(),
                "history": history}

    def restore(self, state: dict, keeper: "Keeper") -> tuple[list[dict], int]:
        """Continue from last.pt's ``state``: (the history so far, the first epoch to run)."""
        self.model.net.load_state_dict(state["state_dict"])
        self.opt.load_state_dict(state["optimizer"])
        if self.average is not None:
            self.average.model.net.load_state_dict(state["average"])
            self.average.steps = state["average_steps"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        keeper.restore(state.get("best"))
        return state["history"], state["epoch"] + 1


def make_loop(model: nn.Module, data, spec, runtime: Runtime) -> Loop:
    """The model on its device and memory format (under torchrun in DDP), its optimizer (no
    weight decay on BatchNorm and biases; frozen parameters left out), weight average and scaler."""
    device, world = runtime.device, dist.world()
    fmt = torch.channels_last if spec.memory_format == "channels-last" else torch.contiguous_format
    if world > 1 and spec.sync_bn:
        model.net = nn.SyncBatchNorm.convert_sync_batchnorm(model.net)
    model.to(device, memory_format=fmt)
    # Under torchrun, DDP averages the gradients; each process runs its shard of every epoch.
    forward = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=spec.stochastic_depth < 1)  # a dropped unit's parameters get no gradient
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    opt = optimizer(spec, [{"params": decay, "weight_decay": spec.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}])
    # fp16's narrow range underflows small gradients: the loss is scaled up, the step down (a no-op otherwise).
    scaler = torch.amp.GradScaler(device.type, enabled=spec.precision == "fp16")
    steps_per_epoch = -(-(len(data.train) // world) // runtime.batch_size)  # every process the same steps
    return Loop(model, forward, opt, WeightAverage(model, spec.ema) if spec.ema > 0 else None, scaler, fmt,
                steps_per_epoch, spec.epochs * steps_per_epoch)


def train(model: nn.Module, data, spec, runtime: Runtime) -> "TrainResult":
    """Train ``model`` on ``data.train`` (:func:`train_one_epoch`), evaluating on ``data.test``
    and every extra set after each epoch (:func:`evaluate_all`); writes model.pt, last.pt and
    metrics.csv into the run directory every epoch (atomically; nothing without one). With
    ``data.resume`` (the state of last.pt), continues where it ended."""
    start = time.perf_counter()
    loop = make_loop(model, data, spec, runtime)
    keeper = Keeper(spec.keep, "val" if data.val is not None else "test")
    history, first_epoch = loop.restore(data.resume, keeper) if data.resume is not None else ([], 0)
    eval_rt = runtime.with_(batch_size=max(runtime.batch_size, 256), progress=False)
    final: dict[str, EvalResult] = {}
    warned = divergence_warning(history) is not None  # said once, by the run that saw it
    for epoch in range(first_epoch, spec.epochs):
        t0 = time.perf_counter()
        stats = train_one_epoch(loop, data, spec, runtime, epoch)
        dist.sync_buffers(loop.trained)  # process 0's BatchNorm statistics: what is evaluated is what is saved
        final = evaluate_all(loop.trained, data, spec, eval_rt, loop.fmt,
                             test=data.val is None or epoch + 1 == spec.epochs)
        history.append(stats.row(epoch, final, time.perf_counter() - t0))
        improved = keeper.update(history[-1], loop.trained)
        if dist.is_main():
            warned = _record_epoch(loop, data, spec, runtime, keeper, history, improved, final, warned)
    final = _kept(loop, keeper, data, spec, runtime, eval_rt, final)
    diverging = divergence_warning(history)
    return TrainResult(model=model.name, history=history, final=final["test"],
                       checkpoint=runtime.out / MODEL_FILE if runtime.out is not None else None,
                       seconds=time.perf_counter() - start,
                       eval_sets={n: r for n, r in final.items() if n != "test"},
                       frozen=getattr(model, "frozen", []), init=getattr(model, "init", "none"),
                       preview=data.preview, warnings=[diverging] if diverging else [], trained=loop.trained,
                       dataset=data.train.name, kept=keeper.record(len(history)), samples=data.samples)


def _record_epoch(loop: Loop, data, spec, runtime: Runtime, keeper: "Keeper", history: list[dict], improved: bool,
                  final: dict, warned: bool) -> bool:
    """Process 0's part of an epoch: tracking, the divergence note (once; returns whether it was
    said), model.pt, last.pt and metrics.csv, the terminal's line."""
    row, epoch = history[-1], history[-1]["epoch"] - 1
    if runtime.tracker:
        runtime.tracker.epoch(row, epoch + 1)
    if not warned and divergence_warning(history):
        note(divergence_warning(history))
        warned = True
    if runtime.out is not None:
        if improved or spec.keep == "last":
            save_checkpoint(loop.trained, runtime.out / MODEL_FILE, _meta(data, row, runtime, dist.world(), spec))
        atomic_save(loop.state(epoch, data, keeper, history), runtime.out / STATE_FILE)
        write_csv(runtime.out / "metrics.csv", history)
    shown = "".join(f" | {n} loss {r.loss:.4f} acc {r.accuracy:.4f}" for n, r in final.items() if n in ("val", "test"))
    extra = "".join(f" | {n} acc {r.accuracy:.4f}" for n, r in final.items() if n not in ("val", "test"))
    print(f"epoch {epoch + 1}/{spec.epochs}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
          f"{shown}{extra} | {row['seconds']:.1f}s", flush=True)
    return warned


def _kept(loop: Loop, keeper: "Keeper", data, spec, runtime: Runtime, eval_rt: Runtime, final: dict) -> dict:
    """The evaluations reported: of the best epoch's weights with --keep best (put into the model,
    and their test figures into model.pt), else of the last epoch's."""
    trained = loop.trained
    if keeper.rule == "best" and keeper.weights is not None:  # the kept weights are what is reported
        trained.net.load_state_dict(keeper.weights)
        final = evaluate_all(trained, data, spec, eval_rt, loop.fmt)
        if dist.is_main() and runtime.out is not None:  # the kept model's test figures into its checkpoint
            save_checkpoint(trained, runtime.out / MODEL_FILE,
                            _meta(data, keeper.row, runtime, dist.world(), spec, final))
    elif "test" not in final:  # resumed a finished run: report the saved model
        final = evaluate_all(trained, data, spec, eval_rt, loop.fmt)
    return final


def optimizer(spec, groups: list[dict]) -> torch.optim.Optimizer:
    """--optimizer over the parameter groups (weight decay set per group)."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.base_lr(), momentum=spec.momentum, nesterov=spec.momentum > 0)
    betas = tuple(spec.betas) if spec.betas else (0.9, 0.999)
    cls = torch.optim.Adam if spec.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=spec.base_lr(), betas=betas)


def _meta(data, row: dict, runtime: Runtime, world: int, spec, final: dict | None = None) -> dict:
    meta = {"dataset": data.train.name, "epoch": row["epoch"], "seed": runtime.seed, "world_size": world,
            "precision": spec.precision}
    for split in ("val", "test"):
        if final is not None and split in final:
            meta[f"{split}_accuracy"], meta[f"{split}_loss"] = final[split].accuracy, final[split].loss
        elif f"{split}_accuracy" in row:
            meta[f"{split}_accuracy"], meta[f"{split}_loss"] = row[f"{split}_accuracy"], row[f"{split}_loss"]
    return meta


class Keeper:
    """--keep: the last epoch's weights, or the best by ``by`` accuracy (the first epoch of the
    highest), with its epoch."""

    def __init__(self, rule: str, by: str):
        self.rule, self.by = rule, by
        self.row: dict | None = None
        self.weights: dict | None = None

    def update(self, row: dict, model: nn.Module) -> bool:
        """Whether ``row``'s model is now the kept one (its weights copied when best)."""
        if self.rule == "last":
            self.row = row
            return True
        if self.row is not None and row[f"{self.by}_accuracy"] <= self.row[f"{self.by}_accuracy"]:
            return False
        self.row = row
        self.weights = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
        return True

    def state(self) -> dict | None:
        return None if self.rule == "last" or self.row is None else {"row": self.row, "weights": self.weights}

    def restore(self, state: dict | None) -> None:
        if state is not None and self.rule == "best":
            self.row, self.weights = state["row"], state["weights"]

    def record(self, epochs: int) -> dict:
        epoch = self.row["epoch"] if self.row is not None else epochs
        return {"rule": self.rule, "epoch": epoch, **({"by": f"{self.by}_accuracy"} if self.rule == "best" else {})}


@dataclass
class EpochStats:
    """What one process's share of an epoch adds up to."""

    lr: float  # the last step's learning rate
    loss_sum: float
    correct: int
    seen: int

    def row(self, epoch: int, final: dict, seconds: float) -> dict:
        """metrics.csv's row of the epoch: the sums over every process, the evaluations."""
        loss_sum, correct, seen = dist.all_sum(torch.tensor([self.loss_sum, self.correct, self.seen],
                                                            dtype=torch.float64)).tolist()
        row = {"epoch": epoch + 1, "lr": self.lr, "train_loss": loss_sum / seen, "train_accuracy": correct / seen}
        for name, res in final.items():
            row[f"{name}_loss"], row[f"{name}_accuracy"] = res.loss, res.accuracy
        row["seconds"] = seconds
        return row


def train_one_epoch(loop: Loop, data, spec, runtime: Runtime, epoch: int) -> EpochStats:
    """One epoch of this process's share of ``data.train``."""
    model, device, bs = loop.model, runtime.device, runtime.batch_size
    rank, world = dist.rank(), dist.world()
    per_process = len(data.train) // world  # every process the same number of images (and steps)
    model.train()
    keep_frozen_bn(model)
    stats = EpochStats(0.0, 0.0, 0, 0)
    # Random numbers are keyed by (seed, epoch): the order by nothing else (every process
    # draws the same and takes its part), augmentation and adversarial batches also by the
    # process. So a resumed epoch draws what the uninterrupted one did.
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(
        hash_seed(runtime.seed, "order", epoch)))[rank * per_process:(rank + 1) * per_process]
    gen = torch.Generator().manual_seed(hash_seed(runtime.seed, "augment", epoch, rank))
    batches: Iterator = batch_progress(data.train, runtime, f"epoch {epoch + 1}/{spec.epochs}", order=order,
                                       generator=gen, augment=data.augment)
    for i, (x, y) in enumerate(batches):
        step = epoch * loop.steps_per_epoch + i
        stats.lr = learning_rate(spec, bs, step, loop.total)
        for group in loop.opt.param_groups:
            group["lr"] = stats.lr
        x, y = _adversarial_part(model, x, y, data, spec, gen, device)
        with torch.autocast(device.type, dtype=AUTOCAST.get(spec.precision), enabled=spec.precision in AUTOCAST):
            logits = loop.forward(x.contiguous(memory_format=loop.fmt))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=spec.label_smoothing)
        value = loss.item()
        if not math.isfinite(value):
            raise FastablateError(f"training diverged: the loss is {value} at epoch {epoch + 1}, step {i + 1}; "
                                  f"lower --lr (the step's learning rate was {stats.lr:.4g})")
        loop.opt.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        loop.scaler.step(loop.opt)
        loop.scaler.update()
        if loop.average is not None:
            loop.average.update(model)
        if runtime.tracker:
            runtime.tracker.step({"train_loss": value, "lr": stats.lr}, step + 1)
        stats.loss_sum += value * y.numel()
        stats.correct += (logits.argmax(1) == y).sum().item()
        stats.seen += y.numel()
    return stats


def _adversarial_part(model: nn.Module, x: Tensor, y: Tensor, data, spec, gen: torch.Generator,
                      device) -> tuple[Tensor, Tensor]:
    """The batch with ``--adv-ratio`` of it adversarial: saved examples (--adv-data, replace) in
    place of its last images, or its first images attacked now against the current model
    (--adv-train)."""
    if data.adv is None and data.adv_spec is None:
        return x, y
    k = round(spec.adv_ratio * x.shape[0])
    if not k:
        return x, y
    if data.adv is not None:
        xa, ya = _saved_batches(data.adv, k, gen, data.augment, device)
        return torch.cat([x[k:], xa]), torch.cat([y[k:], ya])
    with eval_mode(model, frozen=True):
        xa = data.adv_spec.run(model, x[:k], y[:k], generator=gen).x_adv
    model.train()
    keep_frozen_bn(model)
    return torch.cat([xa, x[k:]]), y


@dataclass
class TrainResult:
    model: str
    history: list[dict]  # one row per epoch
    final: EvalResult  # the saved model after the last epoch on the test split
    checkpoint: Path | None  # None: trained without a run directory (from Python)
    seconds: float
    eval_sets: dict[str, EvalResult] = field(default_factory=dict)  # and test_tta with --tta
    frozen: list[str] = field(default_factory=list)
    init: str = "none"
    preview: dict[str, Tensor] = field(default_factory=dict, repr=False)
    warnings: list[str] = field(default_factory=list)  # run.json records them (see the runner)
    trained: nn.Module | None = field(default=None, repr=False)  # what was evaluated (the average with --ema)
    dataset: str = ""
    kept: dict = field(default_factory=dict)  # --keep: {"rule", "epoch"[, "by"]}
    samples: dict[str, Tensor] = field(default_factory=dict, repr=False)  # class -> training images

    def to_dict(self) -> dict:
        return {"accuracy": self.final.accuracy, "loss": self.final.loss, "epochs": len(self.history),
                "checkpoint": str(self.checkpoint) if self.checkpoint else None, "test": self.final.to_dict(),
                "history": self.history,
                "eval_sets": {n: {"accuracy": r.accuracy, "loss": r.loss, "n": r.n} for n, r in self.eval_sets.items()},
                "frozen": self.frozen, "init": self.init, "kept": self.kept}

    def rows(self) -> list[dict]:
        return self.history

    def plot(self, directory: Path, *others: "TrainResult") -> list[Path]:
        out = [plot_curves(self.history, directory / "curves.png")]
        if self.preview:
            out.append(plot_augmentations(self.preview, directory / "augmentations.png"))
        if self.samples:
            out.append(plot_augmentations(self.samples, directory / "samples.png"))
        return out



def plot_curves(history: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch: train, test and every extra evaluation set."""
    sets = ["train"]
    for r in history:  # with a validation split the test split is in the last row only
        sets += [k[:-len("_accuracy")] for k in r if k.endswith("_accuracy") and k[:-len("_accuracy")] not in sets]
    fig, (a, b) = subplots(1, 2, figsize=(10, 3.8))
    for name in sets:
        rows = [r for r in history if f"{name}_accuracy" in r]
        a.plot([r["epoch"] for r in rows], [r[f"{name}_loss"] for r in rows], "o-", ms=3, label=name)
        b.plot([r["epoch"] for r in rows], [r[f"{name}_accuracy"] for r in rows], "o-", ms=3, label=name)
    a.set(xlabel="epoch", ylabel="loss (cross-entropy)")
    b.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return save(fig, path, dpi=120)


def plot_augmentations(preview: dict[str, Tensor], path: Path) -> Path:
    """One row per name (an augmentation on the same training images, the first row the
    originals; or a class and some of its images), labelled on the left."""
    rows = len(preview)
    cols = max(v.shape[0] for v in preview.values())
    fig, axes = subplots(rows, cols, figsize=(1.3 * cols + 1.2, 1.3 * rows), squeeze=False)
    for r, (name, images) in enumerate(preview.items()):
        for c in range(cols):
            ax = axes[r][c]
            if c < images.shape[0]:
                ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            else:
                ax.axis("off")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    return save(fig, path, dpi=110)


def evaluate_all(model: nn.Module, data, spec, runtime: Runtime, fmt, test: bool = True) -> dict[str, EvalResult]:
    """The validation split (``val``), the test split (``test``) and its flip-averaged
    evaluation (``test_tta``) unless ``test`` is False, and every extra set."""
    out = {"val": evaluate(model, data.val, runtime, memory_format=fmt)} if data.val is not None else {}
    if test:
        out["test"] = evaluate(model, data.test, runtime, memory_format=fmt)
    if spec.tta and test:
        out["test_tta"] = evaluate(model, data.test, runtime, tta=True, memory_format=fmt)
    for name, ds in data.eval_sets.items():
        out[name] = evaluate(model, ds, runtime, memory_format=fmt)
    return out
