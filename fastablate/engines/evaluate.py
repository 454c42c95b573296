"""Clean evaluation: accuracy, loss, per-class accuracy, confusion matrix."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastablate.data import ImageSet, batches
from fastablate.engines.common import progress


@dataclass
class EvalResult:
    accuracy: float  # fraction in [0, 1]
    loss: float  # mean cross-entropy, nats
    n: int
    per_class: list[float]  # accuracy of each class
    confusion: list[list[int]]  # [true][predicted] counts
    classes: list[str]
    seconds: float

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "loss": self.loss, "n": self.n,
                "per_class": dict(zip(self.classes, self.per_class)), "confusion": self.confusion,
                "classes": self.classes, "seconds": self.seconds}

    def rows(self) -> list[dict]:
        return [{"class": c, "accuracy": a, "count": sum(self.confusion[i])}
                for i, (c, a) in enumerate(zip(self.classes, self.per_class))]


@torch.no_grad()
def evaluate(model: nn.Module, ds: ImageSet, *, batch_size: int = 256, device: torch.device | str = "cpu",
             show_progress: bool = False, workers: int = 0) -> EvalResult:
    """Evaluate ``model`` (inputs in [0, 1]) on all of ``ds`` in eval mode."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    k = ds.num_classes
    confusion = torch.zeros(k, k, dtype=torch.int64)
    loss_sum = 0.0
    it = batches(ds, batch_size, device=device, workers=workers)
    if show_progress:
        it = progress(it, total=-(-len(ds) // batch_size), desc="eval")
    for x, y in it:
        logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        pred = logits.argmax(1)
        confusion += torch.bincount((y * k + pred).cpu(), minlength=k * k).view(k, k)
    model.train(was_training)
    n = int(confusion.sum())
    counts = confusion.sum(1).clamp(min=1)
    return EvalResult(accuracy=confusion.diag().sum().item() / max(n, 1), loss=loss_sum / max(n, 1), n=n,
                      per_class=(confusion.diag() / counts).tolist(), confusion=confusion.tolist(),
                      classes=list(ds.classes), seconds=time.perf_counter() - start)
