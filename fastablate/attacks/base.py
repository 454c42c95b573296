"""What every attack shares: the result it returns, the objective it ascends, the checks at its
boundary, the recording of its updates, and the torchattacks-style class around a function.

An attack takes images ``x`` (N, C, H, W) in [0, 1] and their labels ``y`` (N,), and returns an
:class:`AttackOutput`: the adversarial images (an image it did not fool: its original) and what
it cost. It stops working on an image as soon as the image is misclassified (with ``target``,
classified as the target). The model is left as it came: its train/eval modes and
``requires_grad`` flags are restored and no ``.grad`` is written (the functions differentiate
with respect to the input only).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastablate.errors import FastablateError
from fastablate.modes import eval_mode, inference_copy


@dataclass
class AttackOutput:
    """An attack's result on N images. ``success``: the model given to the attack was fooled
    (targeted: predicts the target); ``steps``: gradient steps, ``queries``: forward passes of a
    random search, per image; ``l0``: pixels changed (in any channel), ``l2``: the perturbation's
    norm, per image; ``fooled_by`` (an ensemble): the index of the attack that fooled each
    image, -1 for none."""

    x_adv: Tensor
    success: Tensor
    steps: Tensor
    queries: Tensor
    l0: Tensor
    l2: Tensor
    fooled_by: Tensor | None = None


def output(x: Tensor, x_adv: Tensor, success: Tensor, steps: Tensor, queries: Tensor | None = None,
           fooled_by: Tensor | None = None) -> AttackOutput:
    """The :class:`AttackOutput` of adversarial images ``x_adv`` of ``x``."""
    diff = (x_adv - x).detach()
    return AttackOutput(x_adv.detach(), success, steps, torch.zeros_like(steps) if queries is None else queries,
                        (diff != 0).any(1).flatten(1).sum(1), diff.flatten(1).norm(dim=1), fooled_by)


def margin(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """What the attack ascends, per image: untargeted, the best wrong logit minus the true one;
    targeted, the target's logit minus the best other one. Success is margin > 0."""
    cls = y if target is None else target
    own = logits.gather(1, cls[:, None]).squeeze(1)
    other = logits.scatter(1, cls[:, None], float("-inf")).amax(1)
    return other - own if target is None else own - other


def succeeded(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """Per image: misclassified (targeted: classified as the target)."""
    pred = logits.argmax(1)
    return pred != y if target is None else pred == target


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                   loss: str = "margin") -> tuple[Tensor, Tensor]:
    """(d objective / d x, logits): the margin's, or the cross-entropy's (away from ``y``, or towards
    the target)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    if loss == "margin":
        objective = margin(logits, y, target).sum()
    else:
        objective = F.cross_entropy(logits, y, reduction="sum") if target is None else \
            -F.cross_entropy(logits, target, reduction="sum")
    (g,) = torch.autograd.grad(objective, x)
    return g, logits.detach()


def check_inputs(x: Tensor, y: Tensor, target: Tensor | None) -> None:
    """The attack's inputs, checked once where they enter: images (N, C, H, W) in [0, 1], N
    integer labels, a target (N,) that differs from every label."""
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise FastablateError(f"attack: images of shape {tuple(getattr(x, 'shape', ()))}: expected floats "
                              "(N, C, H, W)")
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise FastablateError(f"attack: images range over [{float(x.min()):.3g}, {float(x.max()):.3g}]: attacks "
                              "work on images in [0, 1] (set_normalization_used, or a model that normalizes)")
    if not isinstance(y, Tensor) or y.shape != x.shape[:1] or y.is_floating_point():
        raise FastablateError(f"attack: labels of shape {tuple(getattr(y, 'shape', ()))}: expected {x.shape[0]} "
                              "integer labels")
    if target is not None and (target == y).any():
        i = int((target == y).nonzero()[0])
        raise FastablateError(f"target class {int(target[i])} equals the label of image {i}: nothing to attack")


def check_budget(attack: str, k: int, height: int, width: int) -> None:
    """A sparse budget of ``k`` pixels fits images of ``height`` x ``width`` (the one place this
    rule lives)."""
    if not 1 <= k <= height * width:
        raise FastablateError(f"{attack} attack: k = {k} pixels is not in 1..{height * width} (the pixels of a "
                              f"{height}x{width} image)")


def within_budget(attack: str, best: Tensor, x: Tensor, k: int) -> Tensor:
    """``best``, checked to differ from ``x`` in at most k pixels and to stay in [0, 1]: a
    violation is an error, never a result."""
    changed = (best != x).any(1).flatten(1).sum(1)
    if (changed > k).any() or best.min() < 0 or best.max() > 1:
        raise RuntimeError(f"{attack} attack broke its budget: {int(changed.max())} pixels changed, k = {k}, range "
                           f"[{best.min().item():.4f}, {best.max().item():.4f}]")
    return best


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with its parameters frozen for the attack, both restored after."""
    with eval_mode(model, frozen=True):
        yield model


# --- recording an attack update by update ------------------------------------------------------
_TRACE: ContextVar[Any] = ContextVar("fastablate_attack_trace", default=None)


def trace(images, which: Tensor | None = None) -> None:
    """Report the current candidates of an attack's images ``which`` (default: all) to the
    :class:`Trajectory` recording, if any; ``images`` may be a function making them (made only
    while recording)."""
    rec = _TRACE.get()
    if rec is not None:
        rec.add(images() if callable(images) else images, which)


class Trajectory:
    """The images of one attack run, recorded after every update of the attack (gradient step or
    accepted random-search change): ``frames`` (T + 1, n, C, H, W) on the CPU, the first the
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

    def record(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` with every update recorded; returns what ``fn`` returns."""
        token = _TRACE.set(self)
        try:
            return fn(*args, **kwargs)
        finally:
            _TRACE.reset(token)


class _Rows:
    """A recording seen through some rows of its images: what an attack on those rows reports as
    its image i lands in row ``rows[i]``."""

    def __init__(self, rec, rows: Tensor):
        self.rec, self.rows = rec, rows

    def add(self, images: Tensor, which: Tensor | None) -> None:
        self.rec.add(images, self.rows if which is None else self.rows[which.to(self.rows.device)])


def on_rows(rows: Tensor, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, an attack on the images ``rows`` of the caller's, its updates
    recorded in those rows when the caller's are recorded."""
    rec = _TRACE.get()
    if rec is None:
        return fn(*args, **kwargs)
    token = _TRACE.set(_Rows(rec, rows))
    try:
        return fn(*args, **kwargs)
    finally:
        _TRACE.reset(token)


# --- torchattacks' calling convention ----------------------------------------------------------
class _Normalized(nn.Module):
    def __init__(self, model: nn.Module, mean: Tensor, std: Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)


class Attack:
    """An attack object in torchattacks' shape: ``atk = SparseRS(model, k=5, queries=1000)``, then
    ``x_adv = atk(images, labels)``. ``atk.run(images, labels)`` gives the whole
    :class:`AttackOutput`. Each call attacks an inference copy of the model as it is then
    (BatchNorm folded, channels-last), so the model itself is never changed, switched or given a
    ``.grad``.

    - ``set_normalization_used(mean, std)``: the model takes normalized images; the attack works
      on images in [0, 1] and normalizes them on the way in.
    - ``set_mode_targeted_by_label()``: the labels given are the targets (an image the model
      already classifies as its target is returned as it is, counted a success);
      ``set_mode_targeted_by_function(fn)``: targets are ``fn(images, labels)``;
      ``set_mode_default()``: untargeted.
    - ``seed``: the attack's random numbers come from a generator with this seed (default: the
      global one).
    """

    function: Callable[..., AttackOutput]  # the attack, a function of this package

    def __init__(self, model: nn.Module, *, seed: int | None = None, **options):
        import inspect

        if not isinstance(model, nn.Module):
            raise FastablateError(f"{type(self).__name__}: model of type {type(model).__name__}, expected an "
                                  "nn.Module")
        takes = {n for n, p in inspect.signature(type(self).function).parameters.items()
                 if p.kind is p.KEYWORD_ONLY and n not in ("target", "generator")}
        unknown = sorted(set(options) - takes)
        if unknown:
            raise FastablateError(f"{type(self).__name__}: unknown option {unknown[0]!r}; it takes "
                                  f"{', '.join(sorted(takes))}")
        self.model, self.options, self.seed = model, options, seed
        self.normalization: tuple[Tensor, Tensor] | None = None
        self.targeted: str | Callable | None = None

    def set_normalization_used(self, mean, std) -> None:
        mean, std = (torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
        if mean.shape != std.shape or bool((std <= 0).any()):
            raise FastablateError(f"set_normalization_used: mean {mean.flatten().tolist()} and std "
                                  f"{std.flatten().tolist()}: one value per channel each, the stds positive")
        self.normalization = (mean, std)

    def set_mode_default(self) -> None:
        self.targeted = None

    def set_mode_targeted_by_label(self) -> None:
        self.targeted = "label"

    def set_mode_targeted_by_function(self, target_map_function: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.targeted = target_map_function

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        return self.run(images, labels).x_adv

    def run(self, images: Tensor, labels: Tensor) -> AttackOutput:
        model = self.model if self.normalization is None else _Normalized(self.model, *(
            t.to(images.device) for t in self.normalization))
        copy = inference_copy(model)
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        if self.targeted is None:
            return type(self).function(copy, images, labels, generator=generator, **self.options)
        with torch.no_grad():
            pred = copy(images).argmax(1)
        target = labels if self.targeted == "label" else self.targeted(images, labels)
        y = pred if self.targeted == "label" else labels
        done = pred == target  # classified as the target already: nothing to attack, a success
        todo = (~done & (target != y)).nonzero().squeeze(1)
        zeros = torch.zeros(len(images), dtype=torch.long, device=images.device)
        out = output(images, images.clone(), done, zeros, zeros.clone())
        if todo.numel():
            part = type(self).function(copy, images[todo], y[todo], target=target[todo], generator=generator,
                                       **self.options)
            for name in ("x_adv", "success", "steps", "queries", "l0", "l2"):
                getattr(out, name)[todo] = getattr(part, name).to(getattr(out, name).dtype)
        return out
