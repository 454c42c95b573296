"""block_skip: kernel against the reference, opcheck, gradcheck, layouts, bad input, fallback."""

import re

import pytest
import torch
from conftest import call_fake, run_without_extension

from fastablate import _ext
from fastablate.ops import BlockSkip, block_skip, reference

pytestmark = pytest.mark.numerics  # rerun by .ci/run under another CPU code path

needs_kernel = pytest.mark.skipif(not _ext.loaded, reason=f"extension not loaded: {_ext.load_error()}")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _inputs(device, dtype=torch.float32, n=6, shape=(5, 7, 9)):
    s = torch.randn(n, *shape, device=device).to(dtype)
    r = torch.randn(n, *shape, device=device).to(dtype)
    keep = torch.tensor([i % 3 != 1 for i in range(n)], device=device)
    return s, r, keep


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [True, False])
def test_dense_equals_reference(device, dtype, relu):
    s, r, keep = _inputs(device, dtype)
    out = torch.ops.fastablate.block_skip(s, r, keep, relu, None)
    torch.testing.assert_close(out, reference.block_skip(s, r, keep, relu=relu), rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_form_equals_reference(device, dtype):
    s, r, keep = _inputs(device, dtype)
    index = torch.tensor([4, 0, 3], device=device)
    out = torch.ops.fastablate.block_skip(s, r[:3], keep, True, index)
    ref = reference.block_skip(s, r[:3], keep, relu=True, index=index)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # Rows outside index, and kept rows' residuals, as the dense form would give them.
    dense_r = torch.zeros_like(r)
    dense_r[index] = r[:3]
    in_index = torch.zeros_like(keep)
    in_index[index] = True
    torch.testing.assert_close(out, reference.block_skip(s, dense_r, keep & in_index), rtol=0, atol=0)


def test_lesioned_rows_are_the_shortcut(device):
    s, r, keep = _inputs(device)
    r[~keep] = float("inf")  # a dropped residual never leaks, not even as nan
    out = block_skip(s, r, keep, relu=False)
    torch.testing.assert_close(out[~keep], s[~keep], rtol=0, atol=0)
    torch.testing.assert_close(out[keep], s[keep] + r[keep], rtol=0, atol=0)


def test_large_parallel_path(device):
    # Several parallel_for chunks per row; an output over 8 MiB (advised onto huge pages on CPU)
    s, r, keep = _inputs(device, n=40, shape=(64, 32, 32))
    torch.testing.assert_close(block_skip(s, r, keep), reference.block_skip(s, r, keep), rtol=0, atol=0)


def test_noncontiguous_and_channels_last(device):
    s, r, keep = _inputs(device, shape=(4, 8, 8))
    cl = block_skip(s.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last), keep)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, reference.block_skip(s, r, keep), rtol=0, atol=0)
    mixed = block_skip(s.to(memory_format=torch.channels_last), r, keep)
    torch.testing.assert_close(mixed, reference.block_skip(s, r, keep), rtol=0, atol=0)
    st, rt = s.transpose(2, 3), r[:, :, ::2].transpose(2, 3)
    st = st[:, :, :, ::2]
    assert not st.is_contiguous() and not rt.is_contiguous()
    torch.testing.assert_close(block_skip(st, rt, keep), reference.block_skip(st, rt, keep), rtol=0, atol=0)


def test_empty(device):
    s = torch.empty(0, 3, 4, 4, device=device)
    assert block_skip(s, s, torch.empty(0, dtype=torch.bool, device=device)).shape == (0, 3, 4, 4)
    s, r, keep = _inputs(device, shape=(0, 4))
    assert block_skip(s, r, keep).shape == s.shape


@needs_kernel
def test_opcheck(device):
    s, r, keep = _inputs(device)
    s.requires_grad_()
    r.requires_grad_()
    torch.library.opcheck(torch.ops.fastablate.block_skip.default, (s, r, keep, True, None))
    torch.library.opcheck(torch.ops.fastablate.block_skip.default,
                          (s, r[:2], keep, False, torch.tensor([5, 1], device=device)))
    for a, b in ((s.transpose(2, 3), r.transpose(2, 3)),
                 (s.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last))):
        torch.library.opcheck(torch.ops.fastablate.block_skip.default, (a, b, keep, True, None))


@pytest.mark.parametrize("relu", [True, False])
def test_gradcheck(device, relu):
    s, r, keep = _inputs(device, torch.float64, n=4, shape=(3, 4))
    s = (s + 0.05 * torch.sign(s)).requires_grad_()  # keep away from relu's kink
    r = r.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: block_skip(a, b, keep, relu=relu), (s, r))
    index = torch.tensor([2, 0], device=device)
    r2 = r[:2].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: block_skip(a, b, keep, relu=relu, index=index), (s, r2))


def test_backward_keep_gates_only_the_gradient(device):
    s, r, keep = _inputs(device, torch.float64, n=4, shape=(3,))
    keep = torch.ones(4, dtype=torch.bool, device=device)
    bkeep = torch.tensor([True, False, True, False], device=device)
    s.requires_grad_()
    r.requires_grad_()
    out = block_skip(s, r, keep, relu=False, backward_keep=bkeep)
    torch.testing.assert_close(out, s + r)  # the forward uses keep
    out.sum().backward()
    torch.testing.assert_close(r.grad, bkeep[:, None].double().expand(4, 3))
    torch.testing.assert_close(s.grad, torch.ones_like(s))


def test_backward_shortcut_gates_the_shortcut_gradient(device):
    s, r, _ = _inputs(device, torch.float64, n=4, shape=(3,))
    keep = torch.ones(4, dtype=torch.bool, device=device)
    via_residual = torch.tensor([True, False, True, False], device=device)
    s.requires_grad_()
    r.requires_grad_()
    out = block_skip(s, r, keep, relu=True, backward_keep=via_residual, backward_shortcut=~via_residual)
    torch.testing.assert_close(out, torch.relu(s + r))
    out.sum().backward()
    active = (s + r > 0).double()
    torch.testing.assert_close(r.grad, via_residual[:, None].double() * active)  # each row: one branch
    torch.testing.assert_close(s.grad, (~via_residual)[:, None].double() * active)
    with pytest.raises(RuntimeError, match=re.escape("backward_shortcut has shape [3], expected (4,)")):
        block_skip(s, r, keep, backward_shortcut=via_residual[:3])


def test_module_form(device):
    s, r, keep = _inputs(device)
    m = BlockSkip(keep)
    torch.testing.assert_close(m(s, r), reference.block_skip(s, r, keep))
    assert "kept=4/6" in repr(m)


@pytest.mark.parametrize("bad, message", [
    (lambda s, r, k: (s, r, k[:3], True, None), "keep has shape [3], expected (6,)"),
    (lambda s, r, k: (s, r, k.float(), True, None), "keep must be bool, got Float"),
    (lambda s, r, k: (s, r.double(), k, True, None), "residual has dtype Double, shortcut has dtype Float"),
    (lambda s, r, k: (s, r[:, :2], k, True, None), "all but the first dimension must match"),
    (lambda s, r, k: (s, r[:4], k, True, None), "residual has 4 rows, shortcut has 6"),
    (lambda s, r, k: (s.long(), r.long(), k, True, None), "shortcut must be a floating tensor, got Long"),
    (lambda s, r, k: (s, r[:2], k, True, torch.tensor([1, 1])), "index holds row 1 twice"),
    (lambda s, r, k: (s, r[:2], k, True, torch.tensor([1, 9])), "index[1] = 9 is out of range [0, 6)"),
    (lambda s, r, k: (s, r[:2], k, True, torch.tensor([1, 2, 3])), "index has 3 entries, residual has 2 rows"),
    (lambda s, r, k: (s, r[:2], k, True, torch.tensor([1., 2.])), "index must be a 1-d int64 tensor"),
])
@pytest.mark.parametrize("impl", ["kernel", "reference", "fake"])
def test_bad_input_messages(bad, message, impl):
    """The kernel, the reference (the fallback) and the fake kernel (torch.compile) fail alike."""
    args = bad(*_inputs("cpu"))
    if impl == "reference":
        def call(s, r, k, relu, index):
            return reference.block_skip(s, r, k, relu=relu, index=index)
    else:
        if not _ext.loaded:
            pytest.skip(f"extension not loaded: {_ext.load_error()}")
        call = torch.ops.fastablate.block_skip
    if impl == "fake" and "index" in message and "must be" not in message and "entries" not in message:
        pytest.skip("index range and distinctness are data: the fake kernel cannot see them")
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call_fake(call, args) if impl == "fake" else call(*args)


def test_fallback_without_extension():
    code = ("import torch; from fastablate.ops import block_skip, kernel_status, reference;"
            "assert not any(ok for devs in kernel_status().values() for ok in devs.values());"
            "s, r = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2); k = torch.tensor([1, 0, 1, 0]).bool();"
            "assert torch.equal(block_skip(s, r, k), reference.block_skip(s, r, k)); print('ok')")
    out = run_without_extension(code)
    assert out.stdout.strip() == "ok"
