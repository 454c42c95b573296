import os
import subprocess
import sys

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_without_extension(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the compiled kernels disabled; assert it succeeds."""
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTABLATE_DISABLE_EXT": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out
