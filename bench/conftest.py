import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES, scope="module")
def device(request):
    return torch.device(request.param)


def timed(benchmark, fn, *args, device):
    """Benchmark fn(*args); on CUDA each timed call waits for the device."""
    fn(*args)  # warm-up (and compilation) outside the timing
    if device.type == "cuda":
        def call():
            out = fn(*args)
            torch.cuda.synchronize()
            return out
        torch.cuda.synchronize()
        return benchmark(call)
    return benchmark(fn, *args)
