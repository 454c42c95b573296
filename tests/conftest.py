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


def call_fake(fn, args):
    """``fn(*args)`` on fake tensors (metadata, no data: what torch.compile traces with)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        return fn(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))


def assert_same_predictions(got, want, *, rtol=None, atol=None, msg=None):
    """Two code paths' logits (..., classes): within the dtype's tolerance (DESIGN.md, Numerics:
    oneDNN picks kernels by batch size and CPU, so bits may differ at the last place), and the
    same predicted class wherever the top two logits of ``want`` are further apart than that
    tolerance could move them."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=msg)
    top = want.topk(2, dim=-1).values
    decided = (top[..., 0] - top[..., 1]) > 1e-3 * (1 + top[..., 0].abs())
    assert torch.equal(got.argmax(-1)[decided], want.argmax(-1)[decided]), msg


def randomize_bn(model):
    """Non-trivial BN statistics and affine parameters, so exactness tests would catch a skipped BN; eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def trained_resnet8(tmp_path_factory):
    """Checkpoint of a resnet8 trained briefly on synthetic images: its predictions vary, so
    noise and attacks can move its accuracy."""
    from click.testing import CliRunner

    from fastablate.cli import cli

    out = tmp_path_factory.mktemp("trained-resnet8")
    r = CliRunner().invoke(cli, ["train", "--model", "resnet8", "--dataset", "synthetic", "--limit", "300",
                                 "--epochs", "3", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out / "model.pt"
