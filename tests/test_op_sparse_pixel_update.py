"""sparse_pixel_update: agreement with the reference, the L0 budget, bounds, bad input.

What is exact and what is not (DESIGN.md, Numerics): the chosen pixels, and the outputs of the
sign step, are exact by construction (saliency is a sum of |g| over channels in one order on both
sides; x + step * sign(g) and the clamp round once). The L2 step divides by the norm of the chosen
gradient entries, a sum the reference leaves to ATen: its outputs agree within the dtype's tolerance.
"""
import re

import pytest
import torch
from conftest import call_fake, run_without_extension

from fastablate import _ext
from fastablate.ops import reference, sparse_pixel_update

pytestmark = pytest.mark.numerics  # rerun by .ci/run under another CPU code path

needs_kernel = pytest.mark.skipif(not _ext.loaded, reason=f"extension not loaded: {_ext.load_error()}")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _inputs(device, dtype=torch.float32, n=5, c=3, h=8, w=9):
    x = torch.rand(n, c, h, w, device=device).to(dtype)
    g = torch.randn(n, c, h, w, device=device).to(dtype)
    return x, g


def assert_matches(out, idx, ref, ref_idx, mode):
    assert torch.equal(idx, ref_idx)
    if mode == "sign":
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref)


def _ref(x, g, k, step, lo=0.0, hi=1.0, **kw):
    c = x.shape[1]
    lo_t = torch.as_tensor(lo, dtype=torch.float64, device=x.device).expand(c).contiguous()
    hi_t = torch.as_tensor(hi, dtype=torch.float64, device=x.device).expand(c).contiguous()
    return reference.sparse_pixel_update(x, g, k, step, lo=lo_t, hi=hi_t, **kw)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["sign", "l2"])
@pytest.mark.parametrize("k", [0, 1, 5, 72])
def test_equals_reference(device, dtype, mode, k):
    x, g = _inputs(device, dtype)
    out, idx = sparse_pixel_update(x, g, k, 0.3, mode=mode)
    ref, ref_idx = _ref(x, g, k, 0.3, mode=mode)
    assert_matches(out, idx, ref, ref_idx, mode)


def test_budget_and_bounds(device):
    x, g = _inputs(device, n=16, h=32, w=32)
    out, idx = sparse_pixel_update(x, g, 5, 0.5)
    changed = (out != x).any(1).flatten(1)  # (N, H*W): pixels changed in any channel
    assert (changed.sum(1) <= 5).all()
    assert torch.equal(changed, torch.zeros_like(changed).scatter_(1, idx, True) & changed)
    assert out.min() >= 0 and out.max() <= 1
    # The chosen pixels are the k most salient.
    sal = g.abs().sum(1).flatten(1)
    assert torch.equal(sal.gather(1, idx), sal.topk(5, dim=1).values)


def test_ties_go_to_lower_index(device):
    x = torch.full((1, 2, 3, 3), 0.5, device=device)
    g = torch.ones(1, 2, 3, 3, device=device)
    g[0, :, 2, 2] = 2.0
    _, idx = sparse_pixel_update(x, g, 4, 0.1)
    assert idx.tolist() == [[8, 0, 1, 2]]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("side", [24, 128])  # fewer tiles of 64 pixels than k, or more
@pytest.mark.parametrize("k", [5, 40, 300])  # a sorted array, a candidate buffer
@pytest.mark.parametrize("ties", [True, False])
def test_large_images_equal_reference(device, dtype, side, k, ties):
    x = torch.rand(4, 3, side, side, device=device).to(dtype)
    # Integer gradients: saliency in 0..6, thousands of ties
    g = (torch.randint(-2, 3, x.shape, device=device) if ties else torch.randn(x.shape, device=device)).to(dtype)
    mode = "sign" if ties else "l2"
    out, idx = sparse_pixel_update(x, g, k, 0.1, mode=mode)
    ref, ref_idx = _ref(x, g, k, 0.1, mode=mode)
    assert_matches(out, idx, ref, ref_idx, mode)


@needs_kernel
def test_large_output_equals_reference(device):
    x, g = _inputs(device, n=8, h=384, w=384)  # 14 MiB: streaming stores, huge pages on CPU
    out, idx = sparse_pixel_update(x, g, 700, 0.1)
    ref, ref_idx = _ref(x, g, 700, 0.1)
    assert torch.equal(idx, ref_idx) and torch.equal(out, ref)


def test_given_indices_and_per_channel_bounds(device):
    x, g = _inputs(device, n=2)
    idx = torch.tensor([[0, 10, 20], [71, 3, 4]], device=device)
    lo, hi = [0.2, 0.0, 0.4], [0.8, 1.0, 0.6]
    out, got = sparse_pixel_update(x, g, 3, 1.0, lo=lo, hi=hi, indices=idx)
    assert torch.equal(got, idx)
    ref, _ = _ref(x, g, 3, 1.0, lo=lo, hi=hi, indices=idx)
    assert torch.equal(out, ref)
    moved = out.flatten(2)[:, :, [0, 10, 20]][0]
    assert (moved[2] >= 0.4).all() and (moved[2] <= 0.6).all()


def test_l2_step_length(device):
    x = torch.full((3, 3, 16, 16), 0.5, dtype=torch.float64, device=device)
    g = torch.randn(3, 3, 16, 16, dtype=torch.float64, device=device)
    out, _ = sparse_pixel_update(x, g, 10, 0.2, mode="l2")
    norms = (out - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.2))


def test_sign_of_zero_gradient_does_not_move(device):
    x = torch.full((1, 3, 4, 4), 0.5, device=device)
    out, _ = sparse_pixel_update(x, torch.zeros_like(x), 3, 0.5)
    assert torch.equal(out, x)
    out, _ = sparse_pixel_update(x, torch.zeros_like(x), 3, 0.5, mode="l2")
    assert torch.equal(out, x)


def test_layouts(device):
    x, g = _inputs(device)
    ref, ref_idx = sparse_pixel_update(x, g, 4, 0.2)
    out, idx = sparse_pixel_update(x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last),
                                   4, 0.2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
    xt = x.transpose(2, 3)
    out, _ = sparse_pixel_update(xt, g.transpose(2, 3), 4, 0.2)
    assert torch.equal(out, sparse_pixel_update(xt.contiguous(), g.transpose(2, 3).contiguous(), 4, 0.2)[0])


def test_empty_batch(device):
    x = torch.empty(0, 3, 4, 4, device=device)
    out, idx = sparse_pixel_update(x, x, 2, 0.1)
    assert out.shape == x.shape and idx.shape == (0, 2)


@needs_kernel
def test_opcheck(device):
    x, g = _inputs(device)
    lo, hi = torch.zeros(3, dtype=torch.float64, device=device), torch.ones(3, dtype=torch.float64, device=device)
    op = torch.ops.fastablate.sparse_pixel_update.default
    for a, b in ((x, g), (x.transpose(2, 3), g.transpose(2, 3)),
                 (x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last))):
        torch.library.opcheck(op, (a, b, 4, 0.1, lo, hi, None, "sign"))
    torch.library.opcheck(op, (x, g, 2, 0.1, lo, hi, torch.zeros(5, 2, dtype=torch.long, device=device), "l2"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("args, message", [
    (lambda x, g, b: (x.long(), g.long(), 2, 0.1, b, b, None, "sign"), "x must be a floating tensor, got Long"),
    (lambda x, g, b: (x[0], g[0], 2, 0.1, b, b, None, "sign"), "x must be (N, C, H, W), got shape [3, 8, 9]"),
    (lambda x, g, b: (x, g[:, :2], 2, 0.1, b, b, None, "sign"), "grad has shape [5, 2, 8, 9], x has shape"),
    (lambda x, g, b: (x, g.double(), 2, 0.1, b, b, None, "sign"), "grad has dtype Double, x has dtype Float"),
    (lambda x, g, b: (x, g, 73, 0.1, b, b, None, "sign"), "k must be in [0, H*W = 72], got 73"),
    (lambda x, g, b: (x, g, -1, 0.1, b, b, None, "sign"), "k must be in [0, H*W = 72], got -1"),
    (lambda x, g, b: (x, g, 2, float("inf"), b, b, None, "sign"), "step must be finite, got inf"),
    (lambda x, g, b: (x, g, 2, 0.1, b, b, None, "linf"), "mode must be 'sign' or 'l2', got 'linf'"),
    (lambda x, g, b: (x, g, 2, 0.1, b[:2], b, None, "sign"), "bounds must be float64 tensors of shape (3,)"),
    (lambda x, g, b: (x, g, 2, 0.1, b, b, torch.zeros(5, 3, dtype=torch.long), "sign"),
     "indices has shape [5, 3], expected (5, 2)"),
    (lambda x, g, b: (x, g, 2, 0.1, b, b, torch.full((5, 2), 72), "sign"), "indices must be in [0, 72)"),
    (lambda x, g, b: (x, g, 2, 0.1, b, b, torch.zeros(5, 2, dtype=torch.int32), "sign"), "indices must be int64"),
])
@pytest.mark.parametrize("impl", ["kernel", "reference", "fake"])
def test_bad_input_messages(args, message, impl):
    """The kernel, the reference (the fallback) and the fake kernel (torch.compile) fail alike."""
    x, g = _inputs("cpu")
    a = args(x, g, torch.zeros(3, dtype=torch.float64))
    if impl == "reference":
        x, g, k, step, lo, hi, indices, mode = a
        with pytest.raises(RuntimeError, match=re.escape(message)):
            reference.sparse_pixel_update(x, g, k, step, lo=lo, hi=hi, indices=indices, mode=mode)
        return
    if not _ext.loaded:
        pytest.skip(f"extension not loaded: {_ext.load_error()}")
    if impl == "fake" and "must be in [0, 72)" in message:
        pytest.skip("index ranges are data: the fake kernel cannot see them")
    op = torch.ops.fastablate.sparse_pixel_update
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call_fake(op, a) if impl == "fake" else op(*a)


def test_fallback_without_extension():
    code = ("import torch; from fastablate import _ext; from fastablate.ops import sparse_pixel_update;"
            "assert not _ext.loaded; x = torch.rand(2, 3, 5, 5); g = torch.randn(2, 3, 5, 5);"
            "out, idx = sparse_pixel_update(x, g, 3, 0.5); assert idx.shape == (2, 3);"
            "assert ((out != x).any(1).flatten(1).sum(1) <= 3).all(); print('ok')")
    out = run_without_extension(code)
    assert out.stdout.strip() == "ok"
