"""fastablate: lesion, noise and adversarial robustness studies of ResNets and VGGs.

Every study is a function: ``fastablate.lesion(model, data, ...)``, ``noise``, ``attack``,
``paths``, ``features``, ``evaluate``, ``train`` (see :mod:`fastablate.api`). The primitives
they are made of are public too: ``fastablate.attacks`` (each attack a function and a
torchattacks-style class), ``fastablate.units`` (the unit view), ``fastablate.ops`` (the
kernels), ``fastablate.models``, ``fastablate.data``. Importing the package is cheap (no
torch): everything loads on first use.
"""
__version__ = "0.1.0"

_API = ("attack", "evaluate", "features", "lesion", "noise", "paths", "train", "StudyResult")
_MODULES = ("attacks", "units", "ops", "models", "data")
__all__ = [*_API, *_MODULES, "FastablateError", "__version__"]


def __getattr__(name: str):
    import importlib

    if name in _API:
        return getattr(importlib.import_module("fastablate.api"), name)
    if name in _MODULES:
        return importlib.import_module(f"fastablate.{name}")
    if name == "FastablateError":
        from fastablate.errors import FastablateError

        return FastablateError
    raise AttributeError(f"module 'fastablate' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API, *_MODULES, "FastablateError"])
