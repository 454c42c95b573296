"""The memory layout the kernels give their outputs, for the fake (meta) kernels."""
import torch
from torch import Tensor


def empty_like_output(t: Tensor) -> Tensor:
    """An empty tensor like ``t`` in the layout the kernels produce: channels_last when ``t``
    is laid out that way (ATen's suggest_memory_format), contiguous otherwise."""
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(t, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
