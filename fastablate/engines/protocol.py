"""The study protocol: what every study is, what it is given, what it returns.

A study is a :class:`Study` subclass with a spec (its options, defaults and validation:
:mod:`fastablate.engines.spec`) and a ``run(model, data, spec, runtime)`` that returns a
:class:`Result`. The runner (:mod:`fastablate.engines.runner`) loads the data and the
models, runs the study on a model and on its ``--compare`` models over the same images,
and writes the run directory; the CLI makes the study's command from its spec.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Protocol, Sequence, TypeVar

import torch
from torch import Tensor, nn

from fastablate.data import ImageSet, batches
from fastablate.engines.spec import Spec
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

    def with_(self, **changes) -> "Runtime":
        return replace(self, **changes)

    def artifact(self, name: str) -> Path:
        """Where the study writes file ``name`` (``adversarial.pt`` -> ``<out>/adversarial<suffix>.pt``)."""
        if self.out is None:
            raise RuntimeError(f"no run directory to write {name} into")
        stem, dot, ext = name.partition(".")
        return self.out / f"{stem}{self.suffix}{dot}{ext}"


class Result(Protocol):
    """What a study's run returns; a ``warnings`` list of lines, where a result has one, goes
    into run.json."""

    model: str

    def to_dict(self) -> dict:
        """The model's part of results.json."""

    def rows(self) -> list[dict]:
        """Its rows of results.csv."""

    def plot(self, directory: Path, *others: "Result") -> list[Path]:
        """Draw this result, and the ``--compare`` models' results on the same figures, into ``directory``."""


class Study:
    """Base of every study. Subclasses set the class attributes and ``run``; the defaults of
    the other methods serve a study of trained checkpoints on one split of a dataset."""

    name: ClassVar[str]  # "lesion"
    command: ClassVar[str]  # the CLI command that runs it: "eval"
    spec_class: ClassVar[type[Spec]]
    triggers: ClassVar[tuple[str, ...]] = ()  # spec fields whose being given selects this study within its command
    setup_excludes: ClassVar[tuple[str, ...]] = ()  # shared options that do not apply ("compare", "split", ...)
    # Shared options whose default differs for this study ({"split": "train"}): the command
    # applies them to the options not given (and shows them in --help).
    setup_defaults: ClassVar[dict[str, Any]] = {}

    def load_data(self, setup, spec: Spec, runtime: Runtime) -> Any:
        """The data ``run`` gets: by default the ``--split`` of the dataset, at the image size
        and with the class names of the ``--weights`` checkpoint, made ready by :meth:`prepare`."""
        from fastablate.engines.common import checkpoint_data, load_data

        return self.prepare(load_data(setup, **checkpoint_data(setup.weights)), spec, runtime.seed)

    def prepare(self, ds: ImageSet, spec: Spec, seed: int) -> Any:
        """The data ``run`` gets from the images ``ds`` (from the CLI's dataset or a library
        call's data): by default ``ds`` itself."""
        return ds

    def load_models(self, setup, spec: Spec, data: Any, runtime: Runtime) -> list[nn.Module]:
        """The models: by default ``--weights`` and each ``--compare`` checkpoint, on the device."""
        from fastablate.engines.common import load_checkpoints

        return load_checkpoints(setup, data, runtime, command=self.command)

    def check(self, models: Sequence[nn.Module], data: Any, spec: Spec) -> None:
        """Checks that need the models or the data; all bad input fails here, before anything is written."""

    def run(self, model: nn.Module, data: Any, spec: Spec, runtime: Runtime) -> Result:
        raise NotImplementedError

    def run_info(self, models: Sequence[nn.Module], data: Any, spec: Spec) -> dict:
        """What run.json records beyond the options (e.g. what a training froze)."""
        return {}

    def resumes(self, spec: Spec) -> bool:
        """Whether this run continues the one in its ``--out``."""
        return False

    def document(self, results: Sequence[Result], spec: Spec) -> dict:
        """results.json: the first model's result, and the ``--compare`` models' under ``compare``
        (one dict for one model, a list for several)."""
        out = results[0].to_dict()
        if len(results) == 2:
            out["compare"] = results[1].to_dict()
        elif len(results) > 2:
            out["compare"] = [r.to_dict() for r in results[1:]]
        return out

    def write_artifacts(self, results: Sequence[Result], spec: Spec, runtime: Runtime) -> None:
        """Files beside results.json that a run keeps (adversarial.pt ...), into ``runtime.out``
        (``runtime.with_(suffix=...)`` per compared model is the study's business)."""

    def report(self, results: Sequence[Result], spec: Spec) -> str:
        """What the terminal shows at the end: by default a table of the rows."""
        return table([row for r in results for row in r.rows()])

    def metrics(self, document: dict) -> dict[str, float]:
        """The headline numbers of a results.json (what a sweep tabulates and plots): by default
        its top-level ``accuracy`` and ``loss``."""
        return {k: document[k] for k in ("accuracy", "loss") if isinstance(document.get(k), (int, float))}


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
    from fastablate.engines import distributed as dist

    rank, world = dist.rank(), dist.world()
    it = batches(ds, runtime.batch_size, device=runtime.device, workers=runtime.workers, shard=(rank, world))
    total = len(range(rank, -(-len(ds) // runtime.batch_size), world))
    for k, (x, y) in enumerate(progress(it, total=total, desc=desc, enabled=runtime.progress)):
        yield rank + k * world, x, y
