"""The one loader of the compiled kernels (fastablate._C).

Importing ``fastablate._C`` registers ``torch.ops.fastablate.*``. When it is missing, fails
to load or is disabled with FASTABLATE_DISABLE_EXT=1, fastablate keeps working through the
pure-PyTorch references (``fastablate.ops.reference``) and says so in one warning line.
"""
from __future__ import annotations

import functools
import os
import sys

import torch

_BUILD_HINT = "build it with: pip install --no-build-isolation -e ."
_error: str | None = None
loaded = False

if os.environ.get("FASTABLATE_DISABLE_EXT") == "1":
    _error = "disabled by FASTABLATE_DISABLE_EXT=1"
    print(f"warning: fastablate: compiled kernels not loaded ({_error}); using pure-PyTorch references",
          file=sys.stderr)
else:
    try:
        from fastablate import _C  # noqa: F401  (the import registers the ops)

        loaded = True
    except ImportError as e:  # absent, or built against another torch
        _error = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"warning: fastablate: compiled kernels not loaded ({_error}); using pure-PyTorch references; "
              f"{_BUILD_HINT}", file=sys.stderr)


def load_error() -> str | None:
    """Why the extension is not loaded, or None when it is."""
    return _error


def has_kernel(device: torch.device | str, op: str) -> bool:
    """Whether a compiled kernel of ``op`` is registered for ``device``'s type."""
    return loaded and _registered(torch.device(device).type, op)


@functools.lru_cache(maxsize=None)
def _registered(device_type: str, op: str) -> bool:
    # Asked on every op call: registrations are fixed once the library is loaded, so cache them.
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastablate::{op}", key)
