"""gaussian_noise: reproducibility, agreement with the reference, statistics, layouts, bad input."""
import math
import re

import pytest
import torch
from conftest import call_fake, run_without_extension

from fastablate import _ext
from fastablate.ops import GaussianNoise, gaussian_noise, reference

pytestmark = pytest.mark.numerics  # rerun by .ci/run under another CPU code path

needs_kernel = pytest.mark.skipif(not _ext.loaded, reason=f"extension not loaded: {_ext.load_error()}")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def test_philox_known_answer():
    # Random123's known-answer vector for philox4x32_10, counter 0, key 0.
    words = reference.philox4x32_10(torch.zeros(1, dtype=torch.int64), 0)
    assert [hex(int(w)) for w in words] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1.0, 0.3])
@pytest.mark.parametrize("offset", [0, 3, 1 << 40])
def test_kernel_matches_reference(device, dtype, p, offset):
    x = torch.randn(3, 5, 7, 9, device=device).to(dtype)
    out = gaussian_noise(x, 0.7, p=p, seed=11, offset=offset)
    ref = reference.gaussian_noise(x, 0.7, p=p, seed=11, offset=offset)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out != x, ref != x)  # the Bernoulli masks are integer comparisons: exact
    torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_same_seed_same_bits_other_seed_differs(device):
    x = torch.randn(64, 32, device=device)
    a = gaussian_noise(x, 1.0, p=0.5, seed=5)
    assert torch.equal(a, gaussian_noise(x, 1.0, p=0.5, seed=5))
    assert not torch.equal(a, gaussian_noise(x, 1.0, p=0.5, seed=6))


@needs_kernel
def test_independent_of_thread_count():
    x = torch.randn(4, 64, 32, 32)  # several parallel chunks
    saved = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(gaussian_noise(x, 1.0, p=0.5, seed=9, offset=5))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_offset_continues_the_stream(device):
    x = torch.zeros(1000, device=device)
    whole = gaussian_noise(x, 1.0, p=0.4, seed=2)
    parts = torch.cat([gaussian_noise(x[:333], 1.0, p=0.4, seed=2),
                       gaussian_noise(x[333:], 1.0, p=0.4, seed=2, offset=333)])
    assert torch.equal(whole, parts)


def test_normals_do_not_depend_on_p(device):
    x = torch.zeros(4096, device=device)
    full, half = gaussian_noise(x, 1.0, seed=1), gaussian_noise(x, 1.0, p=0.5, seed=1)
    hit = half != 0
    assert torch.equal(half[hit], full[hit])


def test_statistics(device):
    n = 1 << 21  # 2.1e6 draws
    x = torch.zeros(n, device=device)
    z = gaussian_noise(x, 1.0, seed=123).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs(((z - z.mean()) ** 4).mean().item() - 3) < 5 * math.sqrt(96) * se  # kurtosis of a normal
    assert abs((z.abs() < 1).double().mean().item() - 0.6826894921) < 5 * 0.466 * se
    sigma = 0.25
    y = gaussian_noise(x, sigma, p=0.3, seed=7)
    hit = y != 0
    rate = hit.double().mean().item()
    assert abs(rate - 0.3) < 5 * math.sqrt(0.3 * 0.7) * se
    assert abs(y[hit].double().std().item() - sigma) < 0.01 * sigma


def test_different_offsets_are_independent(device):
    n = 1 << 20
    x = torch.zeros(n, device=device)
    a, b = gaussian_noise(x, 1.0, seed=4), gaussian_noise(x, 1.0, seed=4, offset=n)
    corr = torch.corrcoef(torch.stack([a, b]).double())[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(n)


def test_masks(device):
    x = torch.zeros(4, 3, 5, 5, device=device)
    per_sample = torch.tensor([True, False, True, False], device=device).view(4, 1, 1, 1)
    y = gaussian_noise(x, 1.0, mask=per_sample, seed=1)
    assert (y[1] == 0).all() and (y[3] == 0).all() and (y[0] != 0).all()
    per_channel = torch.tensor([False, True, False], device=device).view(1, 3, 1, 1)
    y = gaussian_noise(x, 1.0, mask=per_channel, seed=1)
    assert (y[:, 1] != 0).all() and (y[:, [0, 2]] == 0).all()
    elem = torch.rand(4, 3, 5, 5, device=device) < 0.5
    y = gaussian_noise(x, 1.0, mask=elem, seed=1)
    assert torch.equal(y != 0, elem)
    # A mask selects from the same stream: masked values equal the unmasked draw.
    full = gaussian_noise(x, 1.0, seed=1)
    assert torch.equal(y[elem], full[elem])
    torch.testing.assert_close(y, reference.gaussian_noise(x, 1.0, mask=elem, seed=1), rtol=1e-5, atol=1e-5)


def test_per_channel_sigma(device):
    x = torch.zeros(2, 3, 64, 64, device=device)
    sigma = torch.tensor([0.0, 1.0, 3.0], device=device)
    y = gaussian_noise(x, sigma, seed=1)
    assert (y[:, 0] == 0).all()
    assert abs(y[:, 2].std().item() / y[:, 1].std().item() - 3) < 0.15
    torch.testing.assert_close(y, reference.gaussian_noise(x, sigma, seed=1), rtol=1e-5, atol=1e-5)


def test_zero_sigma_and_zero_p_are_identity(device):
    x = torch.randn(3, 4, 5, device=device)
    assert torch.equal(gaussian_noise(x, 0.0, seed=1), x)
    assert torch.equal(gaussian_noise(x, 1.0, p=0.0, seed=1), x)


def test_layouts_do_not_change_the_noise(device):
    x = torch.randn(2, 3, 6, 6, device=device)
    ref = gaussian_noise(x, 1.0, seed=3)
    cl = gaussian_noise(x.to(memory_format=torch.channels_last), 1.0, seed=3)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, ref)
    t = x.transpose(2, 3)
    assert torch.equal(gaussian_noise(t, 1.0, seed=3), gaussian_noise(t.contiguous(), 1.0, seed=3))


def test_inplace(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    expected = gaussian_noise(x, 0.5, p=0.5, seed=8)
    y = x.clone()
    assert gaussian_noise(y, 0.5, p=0.5, seed=8, inplace=True) is y and torch.equal(y, expected)
    z = x.clone().to(memory_format=torch.channels_last)
    gaussian_noise(z, 0.5, p=0.5, seed=8, inplace=True)
    assert torch.equal(z, expected)


def test_large_output_equals_inplace(device):
    x = torch.randn(3, 1024, 1024, device=device)  # 12 MiB: a CPU output advised onto huge pages
    y = x.clone()
    gaussian_noise(y, 0.5, p=0.5, seed=8, inplace=True)
    assert torch.equal(gaussian_noise(x, 0.5, p=0.5, seed=8), y)


def test_empty(device):
    x = torch.empty(0, 3, 4, 4, device=device)
    assert gaussian_noise(x, 1.0, seed=1).shape == x.shape


def test_gradient_is_identity(device):
    x = torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gaussian_noise(t, 0.3, p=0.5, seed=1), (x,))
    gaussian_noise(x, 0.3, seed=1).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@needs_kernel
def test_opcheck(device):
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    op = torch.ops.fastablate.gaussian_noise.default
    torch.library.opcheck(op, (x, 0.5, None, 0.5, None, 1, 0))
    torch.library.opcheck(op, (x.transpose(2, 3), 0.5, None, 0.5, None, 1, 0))
    torch.library.opcheck(op, (x.to(memory_format=torch.channels_last), 0.5, None, 1.0, None, 1, 0))
    torch.library.opcheck(op, (x, 1.0, torch.ones(3, device=device), 1.0, None, 1, 4))
    torch.library.opcheck(op, (x, 1.0, None, 1.0, torch.ones(2, 1, 1, 1, dtype=torch.bool, device=device), 1, 0))
    inplace = torch.ops.fastablate.gaussian_noise_.default
    torch.library.opcheck(inplace, (x.detach().clone(), 0.5, None, 0.5, None, 1, 0))


@pytest.mark.parametrize("args, message", [
    (lambda x: (x.long(), 1.0, None, 1.0, None, 0, 0), "x must be a floating tensor, got Long"),
    (lambda x: (x, -1.0, None, 1.0, None, 0, 0), "sigma must be finite and >= 0, got -1"),
    (lambda x: (x, float("nan"), None, 1.0, None, 0, 0), "sigma must be finite and >= 0, got nan"),
    (lambda x: (x, 1.0, None, 1.5, None, 0, 0), "p must be in [0, 1], got 1.5"),
    (lambda x: (x, 1.0, None, 1.0, None, 0, -1), "offset must be >= 0, got -1"),
    (lambda x: (x, 1.0, torch.ones(4), 1.0, None, 0, 0), "sigma has shape [4], expected (3,)"),
    (lambda x: (x, 1.0, None, 1.0, torch.ones(2, 3), 0, 0), "mask must be bool, got Float"),
    (lambda x: (x, 1.0, None, 1.0, torch.ones(5, 1, 1, 1, dtype=torch.bool), 0, 0), "does not broadcast to x"),
])
@pytest.mark.parametrize("impl", ["kernel", "reference", "fake"])
def test_bad_input_messages(args, message, impl):
    """The kernel, the reference (the fallback) and the fake kernel (torch.compile) fail alike."""
    a = args(torch.randn(2, 3, 4, 4))
    if impl == "reference":
        x, sigma, channel, p, mask, seed, offset = a
        with pytest.raises(RuntimeError, match=re.escape(message)):
            reference.gaussian_noise(x, channel if channel is not None else sigma, p=p, mask=mask, seed=seed,
                                     offset=offset)
        return
    if not _ext.loaded:
        pytest.skip(f"extension not loaded: {_ext.load_error()}")
    op = torch.ops.fastablate.gaussian_noise
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call_fake(op, a) if impl == "fake" else op(*a)


def test_module_form_advances_offset():
    m = GaussianNoise(0.5, seed=3)
    x = torch.zeros(10)
    a, b = m(x), m(x)
    assert not torch.equal(a, b) and torch.equal(b, gaussian_noise(x, 0.5, seed=3, offset=10))
    assert "sigma=0.5" in repr(m)


def test_fallback_without_extension():
    code = ("import torch; from fastablate.ops import gaussian_noise, reference; from fastablate import _ext;"
            "assert not _ext.loaded; x = torch.randn(3, 4);"
            "a = gaussian_noise(x, 0.5, p=0.5, seed=2);"
            "assert torch.equal(a, reference.gaussian_noise(x, 0.5, p=0.5, seed=2));"
            "y = x.clone(); gaussian_noise(y, 0.5, seed=2, inplace=True);"
            "assert torch.equal(y, reference.gaussian_noise(x, 0.5, seed=2)); print('ok')")
    out = run_without_extension(code)
    assert out.stdout.strip() == "ok"
    # The one warning line the README promises, also when the kernels are disabled on purpose.
    assert out.stderr.splitlines() == ["warning: fastablate: compiled kernels not loaded (disabled by "
                                       "FASTABLATE_DISABLE_EXT=1); using pure-PyTorch references"]


def test_unmasked_elements_keep_their_bits(device):
    x = torch.full((4096,), -0.0, device=device)
    mask = torch.rand(4096, device=device) < 0.5
    for y in (gaussian_noise(x, 1.0, p=0.5, seed=3), gaussian_noise(x, 1.0, mask=mask)):
        kept = y == 0
        assert kept.any() and torch.signbit(y[kept]).all()  # -0.0 stays -0.0, not +0.0
