import copy
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


def float64(obj):
    """The oracle's copy (DESIGN.md, Numerics): a model deep-copied to float64, or a tensor in float64."""
    if isinstance(obj, torch.nn.Module):
        return copy.deepcopy(obj).double()
    return obj.detach().double() if obj.is_floating_point() else obj


def oracle_error(value, exact) -> float:
    """The largest distance of ``value`` (any dtype) from the float64 ``exact``."""
    return (value.detach().double() - exact.detach().double()).abs().max().item() if exact.numel() else 0.0


def oracle_bound(ref, exact, *, ref_factor: float = 4.0, eps_factor: float = 16.0) -> float:
    """The largest error a fast path may have: ``ref_factor`` times the reference path's own
    distance from float64, plus ``eps_factor`` ulps of the result's scale. A fast path more
    accurate than the reference always passes; one less accurate fails on every machine."""
    scale = exact.detach().abs().max().item() if exact.numel() else 0.0
    return ref_factor * oracle_error(ref, exact) + eps_factor * torch.finfo(ref.dtype).eps * scale


def assert_near_oracle(fast, ref, exact, *, msg="", **factors):
    """``fast`` and ``ref``: one computation by a fast path and by its reference path, in the
    working dtype; ``exact``: the reference path in float64. The fast path's distance from
    ``exact`` is within :func:`oracle_bound` (DESIGN.md, Numerics: never judge one float32
    path by its distance to another; oneDNN picks kernels by CPU, caches and batch size)."""
    assert fast.shape == exact.shape and ref.shape == exact.shape, (msg, fast.shape, ref.shape, exact.shape)
    err, bound = oracle_error(fast, exact), oracle_bound(ref, exact, **factors)
    assert err <= bound, (f"{msg}: the fast path is {err:.3g} from float64, over the bound {bound:.3g} (the "
                          f"reference path is {oracle_error(ref, exact):.3g} from it, the scale "
                          f"{exact.abs().max().item():.3g})")


def decided(exact, bound: float):
    """The rows of float64 logits (..., classes) whose top-two margin is above what errors of
    ``bound`` in each logit could close: every path within the bound predicts their class."""
    top = exact.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]) > 2 * bound


def assert_same_predictions(fast, ref, exact, *, msg=""):
    """Logits (..., classes) of a fast path and its reference path near the float64 ``exact``
    (:func:`assert_near_oracle`), and the same predicted class as float64 on every row whose
    margin the bound cannot close (the accuracy promise: DESIGN.md, Numerics)."""
    assert_near_oracle(fast, ref, exact, msg=msg)
    rows = decided(exact, max(oracle_bound(ref, exact), oracle_error(fast, exact)))
    want = exact.argmax(-1)[rows]
    assert torch.equal(fast.argmax(-1)[rows], want) and torch.equal(ref.argmax(-1)[rows], want), msg


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
