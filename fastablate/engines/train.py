"""Training: SGD with Nesterov momentum, cosine learning-rate schedule, weight decay,
optional label smoothing; per-epoch metrics and checkpoints; resumable.

Defaults follow the CIFAR recipe of He et al. 2016 adapted to a cosine schedule
(Loshchilov & Hutter 2017): lr 0.1 per 128 images, momentum 0.9, weight decay 5e-4.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from fastablate.data import ImageSet
from fastablate.engines.common import load_data, load_or_build_model
from fastablate.engines.evaluate import EvalResult, evaluate
from fastablate.engines.protocol import Runtime, Study, batch_progress, table
from fastablate.engines.spec import Float, Int, Spec, option
from fastablate.errors import FastablateError
from fastablate.models import NormalizedModel, save_checkpoint
from fastablate.models.checkpoint import atomic_save
from fastablate.plots import pyplot, save
from fastablate.results import jsonable, write_csv

STATE_FILE = "last.pt"  # optimizer, schedule and RNG state for --resume
MODEL_FILE = "model.pt"  # the model in our checkpoint format
DEFAULT_MODEL = "resnet8"


@dataclass(frozen=True)
class TrainSpec(Spec):
    epochs: int = option(15, "Epochs.", type=Int(min=1, max=100_000))
    lr: float = option(0.1, "Learning rate per 128 images (scaled linearly with --batch-size).",
                       type=Float(0, 100, min_open=True))
    momentum: float = option(0.9, "SGD momentum (Nesterov when > 0).", type=Float(0, 1, max_open=True))
    weight_decay: float = option(5e-4, "Weight decay (not on BatchNorm and biases).", type=Float(0, 1))
    label_smoothing: float = option(0.0, "Label smoothing.", type=Float(0, 1, max_open=True))
    resume: bool = option(False, "Continue the run in --out from its last epoch.")


@dataclass
class TrainData:
    train: ImageSet
    test: ImageSet
    fingerprint: dict = field(default_factory=dict)  # everything that shapes the run (see fingerprint())
    resume: dict | None = None  # the state in last.pt, with --resume


# Shared options that do not change what a training computes.
_NOT_FINGERPRINTED = ("out", "workers", "device", "force", "split", "compare")


def fingerprint(setup, spec: TrainSpec, train_set: ImageSet, test_set: ImageSet) -> dict:
    """What --resume checks: every option that shapes the run (model, data, optimizer, seed,
    schedule) and the data it found (classes, sizes, the labels' digest)."""
    labels = hashlib.blake2b(train_set.labels.numpy().tobytes() + test_set.labels.numpy().tobytes(),
                             digest_size=8).hexdigest()
    return {**{k: v for k, v in setup.to_dict().items() if k not in _NOT_FINGERPRINTED},
            **{k: v for k, v in spec.to_dict().items() if k != "resume"},
            "data_dir": str(Path(setup.data_dir).resolve()) if setup.data_dir else None,
            "classes": list(train_set.classes), "image_size": train_set.image_size,
            "images": [len(train_set), len(test_set)], "labels": labels}


@dataclass
class TrainResult:
    model: str
    history: list[dict]  # one row per epoch
    final: EvalResult  # the model after the last epoch on the test split
    checkpoint: Path
    seconds: float

    def to_dict(self) -> dict:
        return {"accuracy": self.final.accuracy, "loss": self.final.loss, "epochs": len(self.history),
                "checkpoint": str(self.checkpoint), "test": self.final.to_dict(), "history": self.history}

    def rows(self) -> list[dict]:
        return self.history

    def plot(self, directory: Path, *others: "TrainResult") -> list[Path]:
        return [plot_history(self.history, directory / "training.png")]


def _lr(spec: TrainSpec, batch_size: int, step: int, total: int) -> float:
    base = spec.lr * batch_size / 128
    return base * 0.5 * (1 + math.cos(math.pi * step / total))


def load_resume_state(out: Path) -> dict:
    """The training state in ``out/last.pt``."""
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise FastablateError(f"--resume: no {STATE_FILE} in {str(out)!r}; nothing to resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files
        raise FastablateError(f"--resume: cannot read {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if not isinstance(state, dict) or not {"epoch", "state_dict", "optimizer", "history"} <= set(state):
        raise FastablateError(f"--resume: {path} is not a fastablate training state")
    return state


def train(model: NormalizedModel, data: TrainData, spec: TrainSpec, runtime: Runtime) -> TrainResult:
    """Train ``model`` on ``data.train``, evaluating on ``data.test`` after every epoch.

    Writes ``model.pt`` and ``last.pt`` into the run directory at every epoch (atomically),
    and ``metrics.csv``. With ``data.resume`` (the state of ``last.pt``), continues where
    that state ended.
    """
    start = time.perf_counter()
    device, bs = runtime.device, runtime.batch_size
    model.to(device)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)  # no weight decay on BN and biases
    opt = torch.optim.SGD([{"params": decay, "weight_decay": spec.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=spec.lr, momentum=spec.momentum, nesterov=spec.momentum > 0)
    gen = torch.Generator().manual_seed(runtime.seed)  # data order and augmentation
    steps_per_epoch = -(-len(data.train) // bs)
    total = spec.epochs * steps_per_epoch
    history: list[dict] = []
    first_epoch = 0
    if data.resume is not None:
        state = data.resume
        model.net.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, first_epoch = state["history"], state["epoch"] + 1
    eval_runtime = runtime.with_(batch_size=max(bs, 256), progress=False)
    final = None
    for epoch in range(first_epoch, spec.epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        batches = batch_progress(data.train, runtime, f"epoch {epoch + 1}/{spec.epochs}", shuffle=True,
                                 generator=gen, augment=True)
        for i, (x, y) in enumerate(batches):
            lr = _lr(spec, bs, epoch * steps_per_epoch + i, total)
            for group in opt.param_groups:
                group["lr"] = lr
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=spec.label_smoothing)
            value = loss.item()
            if not math.isfinite(value):
                raise FastablateError(f"training diverged: the loss is {value} at epoch {epoch + 1}, step {i + 1}; "
                                      f"lower --lr (the step's learning rate was {lr:.4g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += value * y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            seen += y.numel()
        final = evaluate(model, data.test, eval_runtime)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
               "test_loss": final.loss, "test_accuracy": final.accuracy, "seconds": time.perf_counter() - t0}
        history.append(row)
        meta = {"dataset": data.train.name, "epoch": epoch + 1, "test_accuracy": final.accuracy,
                "test_loss": final.loss, "seed": runtime.seed}
        save_checkpoint(model, runtime.out / MODEL_FILE, meta)
        atomic_save({"arch": model.arch, "epoch": epoch, "state_dict": model.net.state_dict(),
                     "optimizer": opt.state_dict(), "generator": gen.get_state(), "fingerprint": data.fingerprint,
                     "torch_rng": torch.get_rng_state(), "history": history}, runtime.out / STATE_FILE)
        write_csv(runtime.out / "metrics.csv", history)
        print(f"epoch {epoch + 1}/{spec.epochs}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
              f" | test loss {final.loss:.4f} acc {final.accuracy:.4f} | {row['seconds']:.1f}s", flush=True)
    if final is None:  # resumed a finished run: report the saved model
        final = evaluate(model, data.test, eval_runtime)
    return TrainResult(model.name, history, final, runtime.out / MODEL_FILE, time.perf_counter() - start)


def plot_history(history: list[dict], path: Path) -> Path:
    epochs = [r["epoch"] for r in history]
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [r["train_loss"] for r in history], label="train")
    a.plot(epochs, [r["test_loss"] for r in history], label="test")
    a.set(xlabel="epoch", ylabel="loss")
    a.legend()
    b.plot(epochs, [r["train_accuracy"] for r in history], label="train")
    b.plot(epochs, [r["test_accuracy"] for r in history], label="test")
    b.set(xlabel="epoch", ylabel="accuracy")
    b.legend()
    return save(fig, path, dpi=120)


class TrainStudy(Study):
    """Train a model (default: resnet8 on the embedded digits) and evaluate it after every
    epoch. --limit applies to both splits; --weights initializes from a checkpoint."""

    name = "train"
    command = "train"
    spec_class = TrainSpec
    setup_excludes = ("split", "compare")

    def load_data(self, setup, spec: TrainSpec, runtime) -> TrainData:
        if spec.resume and not setup.out:
            raise FastablateError("--resume needs --out DIR of the run to continue")
        train_set = load_data(setup, "train")
        test_set = load_data(setup, "test", image_size=train_set.image_size, classes=train_set.classes,
                             classes_of="the train split")
        return TrainData(train_set, test_set, jsonable(fingerprint(setup, spec, train_set, test_set)),
                         load_resume_state(Path(setup.out)) if spec.resume else None)

    def load_models(self, setup, spec, data: TrainData, runtime):
        return [load_or_build_model(setup, data.train, default_arch=DEFAULT_MODEL)]

    def check(self, models, data: TrainData, spec):
        if data.resume is None:
            return
        old = data.resume.get("fingerprint")
        if old is None:
            raise FastablateError("--resume: the run's last.pt records no fingerprint of its options; start a fresh "
                                  "run")
        diff = [k for k in sorted(set(old) | set(data.fingerprint)) if old.get(k) != data.fingerprint.get(k)]
        if diff:
            shown = "; ".join(f"{k} was {old.get(k)!r}, now {data.fingerprint.get(k)!r}" for k in diff[:3])
            raise FastablateError(f"--resume: this is not the run in --out, which it would continue ({shown}); "
                                  "resume with the run's own options, or start a fresh run")

    def resumes(self, spec: TrainSpec) -> bool:
        return spec.resume

    def run(self, model, data, spec, runtime):
        return train(model, data, spec, runtime)

    def report(self, results: Sequence[TrainResult], spec) -> str:
        r = results[0]
        return "\n".join([table(r.final.rows()),
                          f"\n{r.model}: test accuracy {r.final.accuracy:.4f} ({r.final.n} images), "
                          f"loss {r.final.loss:.4f}", f"checkpoint: {r.checkpoint}"])
