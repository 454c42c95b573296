"""The layers of a model as the feature maps see them: each named module's output shape on one
image, a transformer's tokens as their patch grid."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastablate.modes import eval_mode

MAX_PREFIX_TOKENS = 8  # class, distillation and register tokens before a transformer's patch tokens


def token_grid(a: Tensor) -> tuple[Tensor, int] | None:
    """A transformer's tokens ``(N, prefix + h*w, C)`` as the patch grid ``(N, C, h, w)`` with
    the number of prefix tokens (class, distillation, registers); None for any other shape."""
    if a.dim() != 3:
        return None
    n, tokens, c = a.shape
    for prefix in range(min(MAX_PREFIX_TOKENS, tokens - 4) + 1):
        side = math.isqrt(tokens - prefix)
        if side * side == tokens - prefix:
            return a[:, prefix:].transpose(1, 2).reshape(n, c, side, side), prefix
    return None


def layer_shapes(model: nn.Module, image_size: int) -> dict[str, tuple[int, ...]]:
    """Module name -> output shape (one image) of every named module of the net whose output
    is a tensor, in forward order (a transformer's tokens as their patch grid, C x h x w)."""
    net = getattr(model, "net", model)
    shapes: dict[str, tuple[int, ...]] = {}

    def keep(name):
        def hook(module, inputs, output):  # returns None: the output stays as it is
            if isinstance(output, Tensor) and name not in shapes:
                grid = token_grid(output)
                shapes[name] = tuple((grid[0] if grid else output).shape[1:])
        return hook
    hooks = [m.register_forward_hook(keep(n)) for n, m in net.named_modules() if n]
    p = next(model.parameters())
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    return shapes
