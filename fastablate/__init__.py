"""fastablate: lesion, noise and adversarial robustness studies of ResNets and VGGs.

Every study is a function: ``fastablate.lesion(model, data, ...)``, ``noise``, ``attack``,
``paths``, ``features``, ``evaluate`` (see :mod:`fastablate.api`). Importing the package is
cheap (no torch): the functions load on first use. The library lives in its submodules:
``fastablate.models``, ``fastablate.data``, ``fastablate.units``, ``fastablate.ops``,
``fastablate.engines``.
"""
__version__ = "0.1.0"

_API = ("attack", "evaluate", "features", "lesion", "noise", "paths", "train", "StudyResult")
__all__ = [*_API, "FastablateError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module("fastablate.api"), name)
    if name == "FastablateError":
        from fastablate.errors import FastablateError

        return FastablateError
    raise AttributeError(f"module 'fastablate' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API, "FastablateError"])
