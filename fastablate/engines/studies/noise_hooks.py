"""Gaussian noise on the outputs of a model's layers, through forward hooks calling
``fastablate.ops.gaussian_noise``: what the noise study perturbs, and what the features study
draws clean beside noisy."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fastablate.engines.core.runtime import hash_seed, model_name
from fastablate.errors import FastablateError
from fastablate.ops import gaussian_noise


LAYER_KINDS = {"conv": (nn.Conv2d,), "linear": (nn.Linear,), "all": (nn.Conv2d, nn.Linear)}
LAYER_WORDS = {"conv": "conv", "linear": "linear", "all": "conv and linear"}


def conv_layers(model: nn.Module, on: str = "conv") -> list[tuple[str, nn.Module]]:
    """The layers noise goes on, in registration order (their order in the forward pass for
    the registry models and torchvision ResNets/VGGs): conv layers; with ``on``, linear
    layers (a transformer's) or both."""
    net = getattr(model, "net", model)
    return [(name, m) for name, m in net.named_modules() if isinstance(m, LAYER_KINDS[on])]


stream_seed = hash_seed  # the Philox key of a (run seed, trial, layer) stream


class NoiseInjector:
    """Forward hooks on every conv layer (every layer of ``on``: conv, linear, all); ``active``
    maps a layer index to (sigma, seed).

    Set ``row`` to the index of the first image of the batch before each forward, so the
    noise of an image does not depend on how the data is batched.
    """

    def __init__(self, model: nn.Module, op: Callable = gaussian_noise, on: str = "conv"):
        self.layers = conv_layers(model, on)
        if not self.layers:
            raise FastablateError(f"model {model_name(model)} has no {LAYER_WORDS[on]} layer to perturb"
                                  + ("; --noise-on linear or all perturbs linear layers" if on == "conv" else ""))
        self.op = op
        self.active: dict[int, tuple[float, int]] = {}
        self.row = 0
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, inputs, out):
            if i in self.active:
                sigma, seed = self.active[i]
                return self.op(out, sigma, seed=seed, offset=self.row * out[0].numel(), inplace=True)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    @torch.no_grad()
    def activation_std(self, model: nn.Module, x: Tensor) -> list[float]:
        """Std of each conv layer's output on ``x`` (the calibration batch), noise off."""
        stds: dict[int, float] = {}
        hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: stds.__setitem__(i, out.float().std().item()))
                 for i, (_, m) in enumerate(self.layers)]
        saved, self.active = self.active, {}
        try:
            model(x)
        finally:
            self.active = saved
            for h in hooks:
                h.remove()
        return [stds[i] for i in range(len(self.layers))]
