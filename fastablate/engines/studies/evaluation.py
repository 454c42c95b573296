"""The evaluation loop every study that trains or scores a model runs: accuracy, loss,
per-class accuracy and the confusion matrix of a model on a set (the evaluate study's result, and
the training's per-epoch scores)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastablate.data import ImageSet
from fastablate.engines.core.distributed import all_sum
from fastablate.engines.core.runtime import Runtime, check_finite, model_name, my_batches, slug
from fastablate.modes import eval_mode
from fastablate.plots import save, subplots


@dataclass
class EvalResult:
    model: str
    accuracy: float  # fraction in [0, 1]
    loss: float  # mean cross-entropy, nats
    n: int
    per_class: list[float | None]  # accuracy of each class; None for a class with no images
    confusion: list[list[int]]  # [true][predicted] counts
    classes: list[str]
    seconds: float
    eval_sets: dict = field(default_factory=dict)  # eval --eval-sets: name -> EvalResult

    def to_dict(self) -> dict:
        # A class with no images has no accuracy: it is left out of per_class, not reported as 0.
        out = {"accuracy": self.accuracy, "loss": self.loss, "n": self.n,
               "per_class": {c: a for c, a in zip(self.classes, self.per_class) if a is not None},
               "confusion": self.confusion, "classes": self.classes, "seconds": self.seconds}
        if self.eval_sets:
            out["eval_sets"] = {n: {"accuracy": r.accuracy, "loss": r.loss, "n": r.n,
                                    "per_class": r.to_dict()["per_class"]} for n, r in self.eval_sets.items()}
        return out

    def rows(self) -> list[dict]:
        return [{"model": self.model, "class": c, "accuracy": a, "count": sum(self.confusion[i])}
                for i, (c, a) in enumerate(zip(self.classes, self.per_class))]

    def plot(self, directory: Path, *others: "EvalResult") -> list[Path]:
        """plots/confusion.png, and confusion-<model>.png for each compared model."""
        return [_plot_confusion(r, directory / ("confusion.png" if i == 0 else f"confusion-{slug(r.model)}.png"))
                for i, r in enumerate((self, *others))]


@torch.no_grad()
def evaluate(model: nn.Module, ds: ImageSet, runtime: Runtime, *, desc: str = "eval", tta: bool = False,
             memory_format: torch.memory_format = torch.contiguous_format) -> EvalResult:
    """Evaluate ``model`` (inputs in [0, 1]) on all of ``ds`` in eval mode; with ``tta``, on
    the mean of the softmax of each image and its horizontal flip."""
    start = time.perf_counter()
    k = ds.num_classes
    confusion = torch.zeros(k, k, dtype=torch.int64)
    loss_sum = 0.0
    with eval_mode(model):
        for _, x, y in my_batches(ds, runtime, desc):
            x = x.contiguous(memory_format=memory_format)
            logits = model(x)
            check_finite(model, logits, x)
            if tta:
                logits = (logits.float().softmax(1) + model(x.flip(3)).float().softmax(1)).div_(2).log_()
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
            pred = logits.argmax(1)
            confusion += torch.bincount((y * k + pred).cpu(), minlength=k * k).view(k, k)
    all_sum(confusion)
    loss_sum = all_sum(torch.tensor([loss_sum], dtype=torch.float64)).item()
    n = int(confusion.sum())
    counts = confusion.sum(1)
    per_class = [(confusion[i, i] / counts[i]).item() if counts[i] else None for i in range(k)]
    return EvalResult(model=model_name(model), accuracy=confusion.diag().sum().item() / max(n, 1),
                      loss=loss_sum / max(n, 1), n=n, per_class=per_class, confusion=confusion.tolist(),
                      classes=list(ds.classes), seconds=time.perf_counter() - start)


def _plot_confusion(res: EvalResult, path: Path) -> Path:
    k = len(res.classes)
    fig, ax = subplots(figsize=(1.2 + 0.45 * k, 1 + 0.45 * k))
    ax.imshow(res.confusion, cmap="Blues")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true",
           title=f"{res.model}: accuracy {res.accuracy:.4f}")
    ax.set_xticklabels(res.classes, rotation=90)
    ax.set_yticklabels(res.classes)
    return save(fig, path)
