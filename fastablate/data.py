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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from fastablate.errors import FastablateError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLITS = ("train", "test")


@dataclass
class ImageSet:
    """Images with labels. ``images`` is (N, C, H, W) uint8, or None when ``files`` are
    decoded per batch (sets larger than the memory limit)."""

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
        """uint8 images (len(index), C, H, W) of the given rows."""
        if self.images is not None:
            return self.images[index]
        return torch.stack([_decode(self.files[i], self.image_size) for i in index.tolist()])


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Callable[..., ImageSet]  # (root, split, download, image_size) -> ImageSet
    needs_root: bool
    description: str


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, load: Callable[..., ImageSet], needs_root: bool, description: str) -> None:
    DATASETS[name] = DatasetSpec(name, load, needs_root, description)


def dataset_names() -> list[str]:
    return list(DATASETS)


def build_dataset(name: str, root: str | os.PathLike | None = None, split: str = "test", *,
                  limit: int | None = None, seed: int = 0, download: bool = False,
                  image_size: int | None = None) -> ImageSet:
    """Load split ``split`` of dataset ``name``.

    Args:
        name: a registry name (``fastablate datasets`` lists them).
        root: the data directory (``--data-dir``); not needed for digits and synthetic.
        split: "train" or "test" (ImageFolder's "val" folder serves as "test").
        limit: a fixed, seeded, class-balanced subset of this many examples.
        seed: seed of the subset.
        download: let torchvision download CIFAR when absent (never implicit).
        image_size: resize ImageFolder/TinyImageNet images to this many pixels square.
    """
    if name not in DATASETS:
        raise FastablateError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise FastablateError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")
    spec = DATASETS[name]
    if spec.needs_root and root is None:
        raise FastablateError(f"dataset {name} needs --data-dir")
    ds = spec.load(Path(root) if root is not None else None, split, download, image_size)
    if limit is not None:
        if limit < 1:
            raise FastablateError(f"--limit must be >= 1, got {limit}")
        ds = ds.subset(balanced_subset(ds.labels, limit, seed))
    return ds


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
        return _decode(self.files[i], self.size), self.labels[i]


def _uint8_batches(ds: ImageSet, order: Tensor, batch_size: int, workers: int) -> Iterator[tuple[Tensor, Tensor]]:
    chunks = [order[s:s + batch_size].tolist() for s in range(0, len(order), batch_size)]
    if ds.images is None and workers > 0:
        yield from torch.utils.data.DataLoader(_FileImages(ds), batch_sampler=chunks, num_workers=workers)
        return
    for idx in chunks:
        index = torch.tensor(idx, dtype=torch.int64)
        yield ds.load(index), ds.labels[index]


def batches(ds: ImageSet, batch_size: int, *, device: torch.device | str = "cpu", shuffle: bool = False,
            generator: torch.Generator | None = None, augment: bool = False,
            workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Float batches in [0, 1] on ``device`` with their labels; the last batch may be short.

    ``workers`` > 0 decodes a file-backed set in that many processes (in-memory sets need none).
    """
    order = torch.randperm(len(ds), generator=generator) if shuffle else torch.arange(len(ds))
    for x, y in _uint8_batches(ds, order, batch_size, workers):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment:
            x = augment_batch(x, flip=ds.flip, generator=generator)
        yield x.float().div_(255), y


def augment_batch(x: Tensor, *, flip: bool, generator: torch.Generator | None = None) -> Tensor:
    """Random crop after zero-padding by 1/8 of the size (4 px at 32 px) and, if ``flip``,
    random horizontal flips; one draw per image, done for the whole batch at once."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (torch.arange(h, device=x.device)[None, :] + shifts[0][:, None])[:, None, :, None]
    cols = torch.arange(w, device=x.device)[None, :] + shifts[1][:, None]
    if flip:
        flipped = torch.rand(n, generator=generator).to(x.device) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[batch, chan, rows, cols[:, None, None, :]]


def _stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div(255).transpose(0, 1).flatten(1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def _decode(path: str, size: int) -> Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2.functional import resize

    img = decode_image(read_file(path), mode=ImageReadMode.RGB)
    if img.shape[1] != size or img.shape[2] != size:
        img = resize(img, [size, size], antialias=True)
    return img


def _memory_limit() -> int:
    return int(os.environ.get("FASTABLATE_MEMORY_LIMIT", 8 << 30))


def _from_files(name, split, files: list[str], labels: list[int], classes, image_size, mean, std) -> ImageSet:
    if image_size is None:
        from torchvision.io import read_image
        image_size = read_image(files[0]).shape[-1]
    label_t = torch.tensor(labels, dtype=torch.int64)
    ds = ImageSet(name, split, label_t, classes, mean, std, image_size, files=files)
    if len(files) * 3 * image_size * image_size <= _memory_limit():
        ds.images = torch.stack([_decode(f, image_size) for f in files])
        ds.files = []
        if mean is None:
            ds.mean, ds.std = _stats(ds.images)
    elif mean is None:
        sample = balanced_subset(label_t, 2000, 0)
        ds.mean, ds.std = _stats(ds.load(sample))
    return ds


# --- the datasets --------------------------------------------------------------------------
def _digits(root, split, download, image_size) -> ImageSet:
    from sklearn.datasets import load_digits

    size = image_size or 32
    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16).mul(255)[:, None]  # (1797, 1, 8, 8), 0..255
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    # Fixed stratified split: 20% of each class, chosen by a permutation with seed 0.
    test = torch.zeros(len(y), dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        test[idx[: idx.numel() // 5]] = True
    mean, std = _stats(x[~test])
    keep = test if split == "test" else ~test
    return ImageSet("digits", split, y[keep], [str(c) for c in range(10)], mean, std, size, flip=False,
                    images=x[keep])


_CIFAR = {  # folder, train files, test file, meta file, label key, class key, mean, std
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                "labels", "label_names", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names",
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _cifar(name):
    """torchvision's on-disk CIFAR format (the python pickles), read directly."""
    def load(root, split, download, image_size) -> ImageSet:
        import pickle

        folder, train_files, test_file, meta_file, label_key, class_key, mean, std = _CIFAR[name]
        base = root / folder
        wanted = (train_files if split == "train" else [test_file]) + [meta_file]
        if download and not all((base / f).is_file() for f in wanted):
            from torchvision import datasets

            (datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100)(str(root), download=True)
        missing = [f for f in wanted if not (base / f).is_file()]
        if missing:
            raise FastablateError(f"dataset {name}: no {', '.join(missing)} in {str(base)!r}; expected {base}/ with "
                                  f"{', '.join(train_files + [test_file, meta_file])} (torchvision's format), "
                                  "or pass --download")

        def read(f):
            try:
                with open(base / f, "rb") as fh:
                    return pickle.load(fh, encoding="latin1")
            except Exception as e:
                raise FastablateError(f"dataset {name}: cannot read {str(base / f)!r}: {e}") from None
        parts = [read(f) for f in wanted[:-1]]
        images = torch.from_numpy(__import__("numpy").concatenate([p["data"] for p in parts]))
        labels = torch.tensor([y for p in parts for y in p[label_key]], dtype=torch.int64)
        return ImageSet(name, split, labels, list(read(meta_file)[class_key]), mean, std, 32,
                        images=images.view(-1, 3, 32, 32).contiguous())
    return load


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _imagefolder(root, split, download, image_size) -> ImageSet:
    layout = "<data-dir>/train/<class>/<image> and <data-dir>/test/<class>/<image> (or val/)"
    folder = root / split
    if split == "test" and not folder.is_dir():
        folder = root / "val"
    if not folder.is_dir():
        raise FastablateError(f"dataset imagefolder: no {split} split at {str(root)!r}; expected {layout}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files, labels = [], []
    for c, cls in enumerate(classes):
        for f in _list_images(folder / cls):
            files.append(str(f))
            labels.append(c)
    if not files:
        raise FastablateError(f"dataset imagefolder: no images under {str(folder)!r}; expected {layout}")
    return _from_files("imagefolder", split, files, labels, classes, image_size, None, None)


def _tinyimagenet(root, split, download, image_size) -> ImageSet:
    layout = ("<data-dir>/wnids.txt, <data-dir>/train/<wnid>/images/*.JPEG, "
              "<data-dir>/val/images/*.JPEG and <data-dir>/val/val_annotations.txt")
    if (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    if not (root / "wnids.txt").is_file():
        raise FastablateError(f"dataset tinyimagenet: no data at {str(root)!r}; expected {layout}")
    wnids = (root / "wnids.txt").read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    files, labels = [], []
    if split == "train":
        for w in wnids:
            for f in _list_images(root / "train" / w / "images"):
                files.append(str(f))
                labels.append(index[w])
    else:
        ann = root / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise FastablateError(f"dataset tinyimagenet: {str(ann)!r} is missing; expected {layout}")
        for line in ann.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                files.append(str(root / "val" / "images" / parts[0]))
                labels.append(index[parts[1]])
    return _from_files("tinyimagenet", split, files, labels, wnids, image_size or 64,
                       (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821))


def _synthetic(root, split, download, image_size) -> ImageSet:
    """10 classes of 32x32 images: class c is a colored sinusoid of its own frequency and
    orientation, plus noise; 1,000 train and 500 test images."""
    size, n = image_size or 32, 1000 if split == "train" else 500
    g = torch.Generator().manual_seed(1 if split == "train" else 2)
    y = torch.arange(n) % 10
    t = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    angle = y.float()[:, None, None] * (torch.pi / 10)
    freq = 2 + (y % 5).float()[:, None, None]
    wave = torch.sin(2 * torch.pi * freq * (xx * torch.cos(angle) + yy * torch.sin(angle)))
    color = torch.stack([(y % 3 == k).float() * 0.5 + 0.25 for k in range(3)], 1)[:, :, None, None]
    x = 0.5 + 0.35 * wave[:, None] * color + 0.1 * torch.randn(n, 3, size, size, generator=g)
    images = x.clamp(0, 1).mul(255).round().to(torch.uint8)
    return ImageSet("synthetic", split, y, [f"class{c}" for c in range(10)], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                    size, images=images)


register_dataset("digits", _digits, False, "embedded default: scikit-learn handwritten digits, 32x32, 1437/360")
register_dataset("cifar10", _cifar("cifar10"), True, "CIFAR-10 in torchvision's format under --data-dir")
register_dataset("cifar100", _cifar("cifar100"), True, "CIFAR-100 in torchvision's format under --data-dir")
register_dataset("imagefolder", _imagefolder, True, "class folders under <data-dir>/train and <data-dir>/test|val")
register_dataset("tinyimagenet", _tinyimagenet, True, "tiny-imagenet-200 layout under --data-dir, 64x64")
register_dataset("synthetic", _synthetic, False, "seeded patterns for tests, 32x32, 1000/500")
