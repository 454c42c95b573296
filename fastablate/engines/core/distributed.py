"""torchrun: every command runs unchanged under ``torchrun --nproc-per-node N -m fastablate``.

Training uses DistributedDataParallel. Studies shard work exactly: process r takes batches
r, r + N, r + 2N, ... of the single-process batching (the same batches, so the same counts,
and at the same thread count the same bits: nothing is padded or evaluated twice), then the counts, losses and per-image
records are reduced, and process 0 writes the one result. Randomness is keyed per batch
(and noise per image), never drawn from a stream shared across batches, so it does not
depend on who runs the batch.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from fastablate.errors import FastablateError


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> tuple[int, int, torch.device | None]:
    """(rank, world size, device) of this process, joining the process group when launched
    by torchrun (NCCL for CUDA, gloo for CPU); (0, 1, None) otherwise."""
    if not launched():
        return 0, 1, None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise FastablateError("--device cuda under torchrun, but no CUDA device is available")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _reduce(t: torch.Tensor, op) -> torch.Tensor:
    if world() == 1:
        return t
    if dist.get_backend() == "nccl" and t.device.type != "cuda":  # NCCL reduces CUDA tensors only
        moved = t.cuda()
        dist.all_reduce(moved, op=op)
        return t.copy_(moved.cpu())
    dist.all_reduce(t, op=op)
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the processes, in place (a no-op alone)."""
    return _reduce(t, dist.ReduceOp.SUM)


def all_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of ``t`` over the processes, in place."""
    return _reduce(t, dist.ReduceOp.MAX)


def gather(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (a list of one alone)."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Process 0's ``obj`` on every process."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every process is here (a no-op alone)."""
    if world() > 1:
        dist.barrier()


def sync_buffers(module: torch.nn.Module) -> None:
    """Process 0's buffers (BatchNorm running statistics) on every process."""
    if world() > 1:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def leave(timeout_s: float = 30.0) -> bool:
    """Meet the other processes (at most ``timeout_s``), joining the group first if this
    process had not (a gloo group: no device is needed to meet); whether there was a group."""
    import datetime

    if not dist.is_available() or not launched():
        return False
    try:
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except Exception:  # the others did not come: leave alone
        return False
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except Exception:  # a process that does not come: leave anyway
        pass
    return True


def close() -> None:
    """Meet the other processes and leave the group: a group left to the interpreter's exit can
    abort a process (its communication threads still running)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def mine(i: int) -> bool:
    """Whether work item ``i`` (a batch, a chunk of samples) is this process's."""
    return i % world() == rank()


def merge(items: list[tuple[int, Any]]) -> list[Any]:
    """(index, value) pairs of every process, gathered and put in index order."""
    return [v for _, v in sorted((p for part in gather(items) for p in part), key=lambda p: p[0])]
