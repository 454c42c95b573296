"""The built-in datasets; each registers itself on import."""
from __future__ import annotations

import pickle
from collections import Counter
from dataclasses import replace

import torch

from fastablate.data import LISTED, ImageSet, balanced_subset, register_dataset
from fastablate.data.image_files import (IMAGE_EXTENSIONS, choose_size, common_size, decode, image_sizes, image_stats,
                                   list_images, memory_limit, note_skipped)
from fastablate.errors import FastablateError


def from_files(name, split, files: list[str], labels: list[int], classes, mean, std) -> ImageSet:
    """An ImageSet of image files, listed: :func:`decode_files` decodes it once
    :func:`fastablate.data.build_dataset` has taken its subset (``--limit`` decodes only what it keeps)."""
    return ImageSet(name, split, torch.tensor(labels, dtype=torch.int64), classes, mean, std, LISTED, files=files)


def decode_files(ds: ImageSet) -> ImageSet:
    """A listed set at its most common image size (the size policy of
    :mod:`fastablate.data.image_files`): decoded into memory when it fits in
    ``FASTABLATE_MEMORY_LIMIT`` (the size estimated from up to 512 headers), else decoded per
    batch. Without a mean, its statistics are measured."""
    from torchvision.transforms.v2.functional import resize

    where = f"{ds.name}/{ds.split}"
    files = ds.files
    sample = files if len(files) <= 512 else [files[i] for i in balanced_subset(ds.labels, 512, 0).tolist()]
    (h, w), _ = Counter(image_sizes(sample)).most_common(1)[0]
    if len(files) * 3 * h * w > memory_limit():
        size = choose_size(files, where)
        out = replace(ds, image_size=size)
        if ds.mean is None:
            out.mean, out.std = image_stats(out.load(balanced_subset(ds.labels, 2000, 0)))
        return out
    decoded = [decode(f) for f in files]
    size = common_size([tuple(im.shape[1:]) for im in decoded], files, where)
    images = torch.stack([im if im.shape[1:] == (size, size) else resize(im, [size, size], antialias=True)
                          for im in decoded])
    out = replace(ds, images=images, files=[], image_size=size)
    if ds.mean is None:
        out.mean, out.std = image_stats(images)
    return out


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
    mean, std = image_stats(x[~test])
    keep = test if split == "test" else ~test
    return ImageSet("digits", split, y[keep], [str(c) for c in range(10)], mean, std, size, flip=False,
                    images=x[keep])


_CIFAR = {  # folder, train files, test file, meta file, label key, class key, mean, std
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                "labels", "label_names", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names",
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class _CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR's python batches and nothing else: a pickle can name any callable, and
    ``pickle.load`` calls it, so a crafted batch file would run code. The format holds dicts,
    lists, strings, bytes, ints and numpy arrays; only the classes that rebuild an array are
    allowed."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"),  # protocol 5
               ("_codecs", "encode")}  # protocol 2 written by Python 3: an array's bytes as latin-1 text

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never holds")


def _cifar(name):
    """torchvision's on-disk CIFAR format (the python pickles), read directly with
    :class:`_CifarUnpickler`."""
    def load(root, split, download, image_size) -> ImageSet:
        import numpy as np

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

        def read(f, keys):
            try:
                with open(base / f, "rb") as fh:
                    doc = _CifarUnpickler(fh, encoding="latin1").load()
            except Exception as e:
                raise FastablateError(f"dataset {name}: cannot read {str(base / f)!r}: {e}") from None
            if not isinstance(doc, dict) or not all(k in doc for k in keys):
                raise FastablateError(f"dataset {name}: {str(base / f)!r} is not a CIFAR batch (no "
                                      f"{' and '.join(keys)})")
            return doc
        parts = [read(f, ("data", label_key)) for f in wanted[:-1]]
        data = [p["data"] for p in parts]
        if not all(isinstance(d, np.ndarray) and d.dtype == np.uint8 and d.ndim == 2 and d.shape[1] == 3072
                   for d in data) or any(len(d) != len(p[label_key]) for d, p in zip(data, parts)):
            raise FastablateError(f"dataset {name}: a batch in {str(base)!r} does not hold uint8 rows of 3072 values "
                                  "with one label each")
        images = torch.from_numpy(np.concatenate(data))
        labels = torch.tensor([y for p in parts for y in p[label_key]], dtype=torch.int64)
        return ImageSet(name, split, labels, list(read(meta_file, (class_key,))[class_key]), mean, std, 32,
                        images=images.view(-1, 3, 32, 32).contiguous())
    return load


def _imagefolder(root, split, download, image_size) -> ImageSet:
    layout = "<data-dir>/train/<class>/<image> and <data-dir>/test/<class>/<image> (or val/)"
    folder = root / split
    if split == "test" and not folder.is_dir():
        folder = root / "val"
    if not folder.is_dir():
        raise FastablateError(f"dataset imagefolder: no {split} split at {str(root)!r}; expected {layout}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels, skipped, other = [], [], [], Counter()
    empty = []
    for c, cls in enumerate(classes):
        found = list_images(folder / cls, skipped, other)
        if not found:
            empty.append(cls)
        files += [str(f) for f in found]
        labels += [c] * len(found)
    note_skipped(skipped, str(folder), other)
    if not files:
        raise FastablateError(f"dataset imagefolder: no images under {str(folder)!r}; expected {layout}")
    if empty:
        raise FastablateError(f"dataset imagefolder: class folder {str(folder / empty[0])!r} holds no image"
                              f"{f' ({len(empty)} such classes)' if len(empty) > 1 else ''}; images are "
                              f"{', '.join(IMAGE_EXTENSIONS)} files")
    return from_files("imagefolder", split, files, labels, classes, None, None)


def _tinyimagenet(root, split, download, image_size) -> ImageSet:
    layout = ("<data-dir>/wnids.txt, <data-dir>/train/<wnid>/images/*.JPEG, "
              "<data-dir>/val/images/*.JPEG and <data-dir>/val/val_annotations.txt")
    if (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    if not (root / "wnids.txt").is_file():
        raise FastablateError(f"dataset tinyimagenet: no data at {str(root)!r}; expected {layout}")
    wnids = (root / "wnids.txt").read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    files, labels, skipped, other = [], [], [], Counter()
    if split == "train":
        for w in wnids:
            for f in list_images(root / "train" / w / "images", skipped, other):
                files.append(str(f))
                labels.append(index[w])
        note_skipped(skipped, str(root / "train"), other)
    else:
        ann = root / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise FastablateError(f"dataset tinyimagenet: {str(ann)!r} is missing; expected {layout}")
        for line in ann.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                files.append(str(root / "val" / "images" / parts[0]))
                labels.append(index[parts[1]])
    return from_files("tinyimagenet", split, files, labels, wnids,
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


register_dataset("digits", _digits, False, "embedded default: scikit-learn handwritten digits, 32x32, 1442/355")
register_dataset("cifar10", _cifar("cifar10"), True, "CIFAR-10 in torchvision's format under --data-dir", True)
register_dataset("cifar100", _cifar("cifar100"), True, "CIFAR-100 in torchvision's format under --data-dir", True)
register_dataset("imagefolder", _imagefolder, True, "class folders under <data-dir>/train and <data-dir>/test|val")
register_dataset("tinyimagenet", _tinyimagenet, True, "tiny-imagenet-200 layout under --data-dir, 64x64")
register_dataset("synthetic", _synthetic, False, "seeded patterns for tests, 32x32, 1000/500")
