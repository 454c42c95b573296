"""How a study runs (:class:`Runtime`: device, batch size, seed, progress, where it writes) and
the helpers every study uses: seeds, names, tables, progress bars, this process's batches,
the finite-logits check.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import torch
from torch import Tensor, nn

from fastablate.data import ImageSet, batches
from fastablate.errors import FastablateError

T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    """How a study runs, as opposed to what it computes (its spec)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 128  # images per forward pass
    workers: int = 0  # decoding processes for file-backed datasets
    seed: int = 0  # every random choice of a study derives from it
    progress: bool = False  # progress bars on stderr (when it is a terminal)
    out: Path | None = None  # the run directory, for files a study writes as it goes
    suffix: str = ""  # appended to the names of those files ("" for the first model of a run)
    model_index: int = 0  # which model of the run: 0 the first, i the i-th --compare model
    tracker: Any = None  # where a run logs as it goes (engines.core.tracking.Tracker), on process 0

    def with_(self, **changes) -> "Runtime":
        return replace(self, **changes)

    def artifact(self, name: str) -> Path:
        """Where the study writes file ``name`` (``adversarial.pt`` -> ``<out>/adversarial<suffix>.pt``)."""
        if self.out is None:
            raise RuntimeError(f"no run directory to write {name} into")
        stem, dot, ext = name.partition(".")
        return self.out / f"{stem}{self.suffix}{dot}{ext}"


def hash_seed(*parts) -> int:
    """A 63-bit seed from the parts (run seed, purpose, batch index, ...)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


def model_name(model: nn.Module) -> str:
    """How results call ``model``: its ``name`` (NormalizedModel), else its class."""
    return getattr(model, "name", None) or type(model).__name__


def slug(text: str) -> str:
    """A file-name-safe form of a model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def check_finite(model: nn.Module, logits: Tensor, x: Tensor) -> None:
    """A study's numbers come from finite logits: NaN or infinite logits of ``model`` on ``x``
    are an error naming the first layer (in the order they run) whose output is not finite,
    never an accuracy."""
    if bool(torch.isfinite(logits).all()):
        return
    first: list[str] = []

    def hook(name):
        def keep(module, inputs, output):
            if not first and isinstance(output, Tensor) and output.is_floating_point() and \
                    not bool(torch.isfinite(output).all()):
                first.append(f"{name} ({type(module).__name__})")
        return keep
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and not list(m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    where = f"they start at layer {first[0]}" if first else "no single layer's output is the first"
    raise FastablateError(f"{model_name(model)} gives NaN or infinite logits on these images; {where}: check its "
                          "weights and BatchNorm statistics")


def default_max_memory(device: torch.device) -> int:
    """Bytes of activations one stacked pass (a chunk of lesion variants, a group of path
    sets) may hold: half the free GPU memory, or a quarter of the available RAM (at most 8 GiB)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        avail = 8 << 30
    return min(avail // 4, 8 << 30)


def table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    """A plain fixed-width table (floats with 4 decimals)."""
    if not rows:
        return ""
    cols = list(columns or rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v)  # noqa: E731
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True) -> Iterable[T]:
    """A progress bar on stderr when ``enabled`` and stderr is a terminal; the items unchanged otherwise."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, leave=False, disable=None, dynamic_ncols=True)


def batch_progress(ds: ImageSet, runtime: Runtime, desc: str, **kw) -> Iterator[tuple[Tensor, Tensor]]:
    """Float batches of ``ds`` in [0, 1] on the runtime's device (see :func:`fastablate.data.batches`),
    with a progress bar when the runtime shows progress."""
    it = batches(ds, runtime.batch_size, device=runtime.device, workers=runtime.workers, **kw)
    return iter(progress(it, total=-(-len(ds) // runtime.batch_size), desc=desc, enabled=runtime.progress))


def my_batches(ds: ImageSet, runtime: Runtime, desc: str) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(batch index, images, labels) of this process's share of the batches of ``ds`` (all of
    them alone; under torchrun, batches rank, rank + N, ...), in order, with a progress bar."""
    from fastablate.engines.core import distributed as dist

    rank, world = dist.rank(), dist.world()
    it = batches(ds, runtime.batch_size, device=runtime.device, workers=runtime.workers, shard=(rank, world))
    total = len(range(rank, -(-len(ds) // runtime.batch_size), world))
    for k, (x, y) in enumerate(progress(it, total=total, desc=desc, enabled=runtime.progress)):
        yield rank + k * world, x, y
