"""Dataset registry: ``build_dataset(name, root, split, ...)``.

Every dataset comes back as an :class:`ImageSet`: decoded uint8 images (N, C, H, W) held
in memory when they fit (``FASTABLATE_MEMORY_LIMIT`` bytes, default 8 GiB), or decoded
per batch from files otherwise. Engines read float batches in [0, 1] through
:func:`batches`; normalization belongs to the model.

- ``digits``: the embedded default, scikit-learn's 1,797 handwritten digits (8x8, shipped
  with the package, no download), upsampled to 32x32 RGB, a fixed stratified 80/20 split.
- ``cifar10``/``cifar100``: torchvision's on-disk format under ``--data-dir``.
- ``imagefolder``: ``<data-dir>/{train,test or val}/<class>/<image>``.
- ``tinyimagenet``: ``<data-dir>/{train/<wnid>/images, val/images + val_annotations.txt, wnids.txt}``.
- ``synthetic``: seeded class-dependent patterns plus noise, learnable in seconds (tests).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from fastablate.data.image_files import decode, memory_limit
from fastablate.errors import FastablateError, note

SPLITS = ("train", "test")
LISTED = 0  # the image_size of a set of files listed but not yet decoded (datasets.from_files)


@dataclass
class ImageSet:
    """Images with labels. ``images`` is (N, C, H, W) uint8 (0..255), or float in [0, 1] (images
    given as tensors from Python), or None when ``files`` are decoded per batch (sets larger
    than the memory limit). ``image_size`` is the size batches come out at: stored images of
    another size are resized per batch, on the batch's device (:meth:`fit`)."""

    name: str
    split: str
    labels: Tensor  # (N,) int64
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    flip: bool = True  # horizontal flips are label-preserving (not for digits)
    images: Tensor | None = None
    files: list[str] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, index: Tensor) -> "ImageSet":
        return ImageSet(self.name, self.split, self.labels[index], self.classes, self.mean, self.std,
                        self.image_size, self.flip,
                        None if self.images is None else self.images[index],
                        [self.files[i] for i in index.tolist()] if self.images is None else [])

    def load(self, index: Tensor) -> Tensor:
        """The stored images (len(index), C, H, W) of the given rows: uint8, or float in [0, 1]."""
        if self.images is not None:
            return self.images[index]
        return torch.stack([decode(self.files[i], self.image_size) for i in index.tolist()])

    def floats(self, index: Tensor) -> Tensor:
        """Float images in [0, 1] (len(index), C, image_size, image_size) of the given rows."""
        return self.fit(to_unit(self.load(index)))

    def fit(self, x: Tensor) -> Tensor:
        """A float batch of stored images at ``image_size`` (bilinear, antialiased, clamped to
        [0, 1]); a batch already that size is returned as it is."""
        if x.shape[-2:] == (self.image_size, self.image_size):
            return x
        from torchvision.transforms.v2.functional import resize

        return resize(x, [self.image_size, self.image_size], antialias=True).clamp_(0, 1)


def to_unit(x: Tensor) -> Tensor:
    """Stored images as floats in [0, 1]: uint8 divided by 255, floats as they are."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Callable[..., ImageSet]  # (root, split, download, image_size) -> ImageSet
    needs_root: bool
    description: str
    downloads: bool = False  # takes --download


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, load: Callable[..., ImageSet], needs_root: bool, description: str,
                     downloads: bool = False) -> None:
    DATASETS[name] = DatasetSpec(name, load, needs_root, description, downloads)


def dataset_names() -> list[str]:
    return list(DATASETS)


def build_dataset(name: str, root: str | os.PathLike | None = None, split: str = "test", *,
                  limit: int | None = None, seed: int = 0, download: bool = False,
                  image_size: int | None = None, classes: Sequence[str] | None = None,
                  classes_of: str = "the model", asked: bool = False) -> ImageSet:
    """Load split ``split`` of dataset ``name``.

    Args:
        name: a registry name (``fastablate datasets`` lists them).
        root: the data directory (``--data-dir``); not needed for digits and synthetic.
        split: "train" or "test" (ImageFolder's "val" folder serves as "test").
        limit: a fixed, seeded, class-balanced subset of this many examples.
        seed: seed of the subset.
        download: let torchvision download CIFAR when absent (never implicit).
        image_size: the model's input size: batches come out this many pixels square,
            resized on their device after decoding (a note says so); the images stay in
            memory at their own size. Default: the dataset's own (for image files, the most
            common size). ``asked``: the user asked for that size (no note).
        classes: the class names the labels index (a checkpoint's, or the training
            split's, named ``classes_of`` in errors): classes are matched by name, and a
            class of the data that is not among them is an error. Default: the data's own.
    """
    ds = list_dataset(name, root, split, limit=limit, seed=seed, download=download, image_size=image_size,
                      classes=classes, classes_of=classes_of)
    if ds.image_size == LISTED:  # files: decoded now, only those kept
        ds = datasets.decode_files(ds)
    if image_size is not None and ds.image_size != image_size:
        if not asked:
            note(f"{ds.name}/{ds.split}: {len(ds)} images of {ds.image_size}x{ds.image_size} are resized to the "
                 f"model's {image_size}x{image_size} per batch")
        ds = resized(ds, image_size)
    return ds


def list_dataset(name: str, root: str | os.PathLike | None = None, split: str = "test", *,
                 limit: int | None = None, seed: int = 0, download: bool = False, image_size: int | None = None,
                 classes: Sequence[str] | None = None, classes_of: str = "the model") -> ImageSet:
    """What :func:`build_dataset` gives before it decodes: image files listed, not read (a set
    that is not files comes decoded); ``len()`` of it is the number of images, at no cost."""
    if name not in DATASETS:
        raise FastablateError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise FastablateError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
    spec = DATASETS[name]
    if spec.needs_root and root is None:
        raise FastablateError(f"dataset {name} needs --data-dir")
    if not spec.needs_root and root is not None:
        raise FastablateError(f"dataset {name} is built in and takes no --data-dir (got {str(root)!r})")
    memory_limit()  # a bad FASTABLATE_MEMORY_LIMIT fails for every dataset, not only large ones
    if download and not spec.downloads:
        raise FastablateError(f"--download applies to {', '.join(n for n, s in DATASETS.items() if s.downloads)}, "
                              f"not to {name}")
    ds = spec.load(Path(root) if root is not None else None, split, download, image_size)
    if classes is not None:
        ds = with_classes(ds, list(classes), classes_of)
    if limit is not None:
        if limit < 1:
            raise FastablateError(f"--limit must be >= 1, got {limit}")
        ds = ds.subset(balanced_subset(ds.labels, limit, seed))
    return ds


def read_saved(path: str, what: str) -> object:
    """The tensors saved in ``path`` (weights only); a missing or unreadable file is an error
    naming it, prefixed by ``what`` (the option, e.g. ``"--examples "``)."""
    p = Path(path)
    if not p.is_file():
        raise FastablateError(f"{what}{path}: no such file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FastablateError(f"{what}{path}: cannot read it ({str(e).splitlines()[0] if str(e) else e!r})") from None


def resized(ds: ImageSet, size: int) -> ImageSet:
    """``ds`` with batches of ``size`` square: in-memory images are resized per batch
    (:meth:`ImageSet.fit`), files decoded at that size."""
    return replace(ds, image_size=size)


def with_classes(ds: ImageSet, classes: list[str], classes_of: str) -> ImageSet:
    """``ds`` with labels indexing ``classes``, matched by name."""
    if list(ds.classes) == classes:
        return ds
    unknown = [c for c in ds.classes if c not in classes]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise FastablateError(f"{ds.name}/{ds.split} has classes that {classes_of} does not know: {shown}; "
                              f"{classes_of} knows {len(classes)}: {', '.join(classes[:10])}"
                              f"{' ...' if len(classes) > 10 else ''}")
    index = torch.tensor([classes.index(c) for c in ds.classes], dtype=torch.int64)
    return replace(ds, labels=index[ds.labels], classes=classes)


def balanced_subset(labels: Tensor, n: int, seed: int) -> Tensor:
    """Sorted indices of ``n`` examples, as equal a share per class as the classes allow,
    chosen by a permutation seeded with ``seed``: the same subset on every run."""
    if n >= labels.numel():
        return torch.arange(labels.numel())
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(labels.numel(), generator=g)
    per_class = [order[labels[order] == c] for c in labels.unique().tolist()]
    # Round-robin over classes in the permuted order: class shares differ by at most one.
    taken, picked, rank = 0, [], 0
    while taken < n:
        for idx in per_class:
            if rank < idx.numel() and taken < n:
                picked.append(idx[rank])
                taken += 1
        rank += 1
    return torch.stack(picked).sort().values


class _FileImages(torch.utils.data.Dataset):
    """Decodes one image of a file-backed ImageSet per item (for DataLoader workers)."""

    def __init__(self, ds: ImageSet):
        self.files, self.labels, self.size = ds.files, ds.labels, ds.image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return decode(self.files[i], self.size), self.labels[i]


def _uint8_batches(ds: ImageSet, order: Tensor, batch_size: int, workers: int,
                   shard: tuple[int, int]) -> Iterator[tuple[Tensor, Tensor]]:
    rank, world = shard
    chunks = [order[s:s + batch_size].tolist() for s in range(0, len(order), batch_size)][rank::world]
    if ds.images is None and workers > 0:
        yield from torch.utils.data.DataLoader(_FileImages(ds), batch_sampler=chunks, num_workers=workers)
        return
    for idx in chunks:
        index = torch.tensor(idx, dtype=torch.int64)
        yield ds.load(index), ds.labels[index]


def batches(ds: ImageSet, batch_size: int, *, device: torch.device | str = "cpu", shuffle: bool = False,
            generator: torch.Generator | None = None, augment: list[tuple[str, float]] | None = None,
            workers: int = 0, order: Tensor | None = None, shard: tuple[int, int] = (0, 1),
            augment_generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Float batches in [0, 1] on ``device`` with their labels; the last batch may be short.

    ``order``: the images in this order (default: as stored, or a permutation drawn from
    ``generator`` with ``shuffle``). ``shard=(r, n)``: only batches r, r + n, r + 2n, ... of
    that batching (the work of process r of n). ``augment``: (name, strength) pairs of
    :mod:`fastablate.data.augment`, applied to each batch with random parameters from
    ``augment_generator`` (default ``generator``). ``workers`` > 0 decodes a file-backed set
    in that many processes (in-memory sets need none).
    """
    from fastablate.data.augment import augment as apply

    if order is None:
        order = torch.randperm(len(ds), generator=generator) if shuffle else torch.arange(len(ds))
    aug_gen = augment_generator or generator
    for x, y in _uint8_batches(ds, order, batch_size, workers, shard):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = ds.fit(to_unit(x))
        yield (apply(x, augment, aug_gen) if augment else x), y


from fastablate.data import datasets  # noqa: E402,F401  (the built-in datasets register themselves)
from fastablate.data.adversarial import load_saved  # noqa: E402,F401  (saved sets: read and checked there)
