"""Module modes that engines set for a while and must restore."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


@contextmanager
def eval_mode(model: nn.Module, *, frozen: bool = False) -> Iterator[nn.Module]:
    """``model`` in eval mode (BatchNorm running statistics, no dropout) for the block; with
    ``frozen``, its parameters also need no gradient (attacks differentiate w.r.t. the input
    only). Both are restored afterwards, also on error: each module's own mode (a model in
    training mode may hold submodules in eval mode, and the other way round)."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()] if frozen else []
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, req in grads:
            p.requires_grad_(req)
        for m, training in modes:
            m.training = training


@contextmanager
def affine_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """Every eval-mode BatchNorm of ``model`` computed as the per-channel affine map it is
    (``x * scale + shift`` from its running statistics) for the block: the same values, but
    its vector-Jacobian product is one multiply, which ``torch.func.vmap`` batches as it is
    (the batch rule of ``native_batch_norm_backward`` copies, and costs a third of a stacked
    backward pass). Modules in training mode or without running statistics are left as they
    are. Restored afterwards, also on error."""
    from torch.nn.modules.batchnorm import _BatchNorm

    patched = []
    for m in model.modules():
        if isinstance(m, _BatchNorm) and not m.training and m.running_var is not None and "forward" not in vars(m):
            with torch.no_grad():
                scale = torch.rsqrt(m.running_var + m.eps)
                if m.weight is not None:
                    scale = scale * m.weight
                shift = -m.running_mean * scale
                if m.bias is not None:
                    shift = shift + m.bias
            m.forward = _affine(scale, shift)
            patched.append(m)
    try:
        yield model
    finally:
        for m in patched:
            del m.forward


def _affine(scale: Tensor, shift: Tensor):
    def forward(x: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 2)  # channels on dim 1: (N, C), (N, C, L), (N, C, H, W), ...
        return torch.addcmul(shift.view(shape), x, scale.view(shape))
    return forward


class InferenceCopy(nn.Module):
    """What :func:`inference_copy` returns: the copy, fed its input in its memory format."""

    def __init__(self, net: nn.Module, memory_format: torch.memory_format):
        super().__init__()
        self.net, self.memory_format = net, memory_format

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x)


def inference_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode, parameters frozen) for attacks, which run thousands of
    forward passes on it and differentiate only with respect to the input: each BatchNorm that
    follows a convolution folded into it (``torch.fx``'s ``fuse``; a model fx cannot trace is
    copied as it is), and its 4-d tensors and inputs in channels-last. The same function as
    ``model`` within float rounding (a few 1e-6 on logits of size 10), less time per
    forward pass (bench/README.md). ``model`` is not changed."""
    import copy

    from torch.fx.experimental.optimization import fuse

    with eval_mode(model, frozen=True):
        try:
            net = fuse(model)  # a traced copy (fuse copies before it folds)
        except Exception:  # fx cannot trace it (data-dependent control flow, ...): the model as it is
            net = copy.deepcopy(model)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return InferenceCopy(net.to(memory_format=torch.channels_last), torch.channels_last)
