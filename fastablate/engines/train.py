"""Training: SGD with Nesterov momentum, cosine learning-rate schedule, weight decay,
optional label smoothing; per-epoch metrics and checkpoints; resumable.

Defaults follow the CIFAR recipe of He et al. 2016 adapted to a cosine schedule
(Loshchilov & Hutter 2017): lr 0.1 per 128 images, momentum 0.9, weight decay 5e-4.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastablate.config import TrainConfig
from fastablate.data import ImageSet, batches
from fastablate.engines.common import progress
from fastablate.engines.evaluate import EvalResult, evaluate
from fastablate.errors import FastablateError
from fastablate.models import NormalizedModel, save_checkpoint
from fastablate.models.checkpoint import atomic_save
from fastablate.plots import pyplot, save
from fastablate.results import RunDir

STATE_FILE = "last.pt"  # optimizer, schedule and RNG state for --resume
MODEL_FILE = "model.pt"  # the model in our checkpoint format


@dataclass
class TrainResult:
    history: list[dict]  # one row per epoch
    final: EvalResult  # the model after the last epoch on the test split
    checkpoint: Path
    seconds: float


def _lr(cfg: TrainConfig, step: int, total: int) -> float:
    base = cfg.lr * cfg.batch_size / 128
    return base * 0.5 * (1 + math.cos(math.pi * step / total))


def load_resume_state(out: Path, arch: str) -> dict:
    """The training state in ``out/last.pt``, checked against the model to resume."""
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise FastablateError(f"--resume: no {STATE_FILE} in {str(out)!r}; nothing to resume")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["arch"] != arch:
        raise FastablateError(f"--resume: {path} trains {state['arch']}, not {arch}")
    return state


def train(cfg: TrainConfig, model: NormalizedModel, train_set: ImageSet, test_set: ImageSet, run: RunDir,
          device: torch.device, resume_state: dict | None = None) -> TrainResult:
    """Train ``model`` on ``train_set``, evaluating on ``test_set`` after every epoch.

    Writes ``model.pt`` and ``last.pt`` into the run directory at every epoch (atomically),
    and ``metrics.csv``. With ``resume_state`` (from :func:`load_resume_state`), continues
    where that state ended.
    """
    start = time.perf_counter()
    model.to(device)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)  # no weight decay on BN and biases
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    gen = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation
    steps_per_epoch = -(-len(train_set) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    history: list[dict] = []
    first_epoch = 0
    state_path = run.path / STATE_FILE
    if resume_state is not None:
        state = resume_state
        model.net.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, first_epoch = state["history"], state["epoch"] + 1
    final = None
    for epoch in range(first_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = progress(batches(train_set, cfg.batch_size, device=device, shuffle=True, generator=gen, augment=True,
                               workers=cfg.workers),
                       total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        for i, (x, y) in enumerate(bar):
            lr = _lr(cfg, epoch * steps_per_epoch + i, total)
            for group in opt.param_groups:
                group["lr"] = lr
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            seen += y.numel()
        final = evaluate(model, test_set, batch_size=max(cfg.batch_size, 256), device=device, workers=cfg.workers)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
               "test_loss": final.loss, "test_accuracy": final.accuracy, "seconds": time.perf_counter() - t0}
        history.append(row)
        meta = {"dataset": train_set.name, "epoch": epoch + 1, "test_accuracy": final.accuracy,
                "test_loss": final.loss, "seed": cfg.seed}
        save_checkpoint(model, run.path / MODEL_FILE, meta)
        atomic_save({"arch": model.arch, "epoch": epoch, "state_dict": model.net.state_dict(),
                     "optimizer": opt.state_dict(), "generator": gen.get_state(),
                     "torch_rng": torch.get_rng_state(), "history": history}, state_path)
        run.write_csv("metrics.csv", history)
        print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
              f" | test loss {final.loss:.4f} acc {final.accuracy:.4f} | {row['seconds']:.1f}s", flush=True)
    if final is None:  # resumed a finished run: report the saved model
        final = evaluate(model, test_set, batch_size=max(cfg.batch_size, 256), device=device, workers=cfg.workers)
    return TrainResult(history, final, run.path / MODEL_FILE, time.perf_counter() - start)


def plot_history(history: list[dict], path: Path) -> None:
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
    save(fig, path, dpi=120)
