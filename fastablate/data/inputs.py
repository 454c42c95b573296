"""The data the library functions take (``fastablate.lesion(model, data, ...)``), made an
:class:`~fastablate.data.ImageSet`: an ``(x, y)`` pair of tensors, a ``Dataset`` of
``(image, label)`` items, a ``DataLoader`` of ``(x, y)`` batches, a registry name (with
``data_dir``), or an ImageSet. Images are in [0, 1] (floats) or 0..255 (uint8), square,
(N, C, H, W); normalization belongs to the model. A Dataset or DataLoader is read once, in
order, into memory.
"""
from __future__ import annotations

import numbers
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import Tensor

from fastablate.data import ImageSet, balanced_subset, build_dataset
from fastablate.data.image_files import image_stats
from fastablate.errors import FastablateError

ACCEPTED = "an (x, y) pair of tensors, a Dataset of (image, label), a DataLoader of (x, y) batches, or a dataset name"


def image_set(data: Any, *, classes: Sequence[str] | None = None, num_classes: int | None = None,
              data_dir: str | None = None, split: str = "test", limit: int | None = None, seed: int = 0,
              image_size: int | None = None, name: str | None = None) -> ImageSet:
    """``data`` as an ImageSet.

    Args:
        data: see the module.
        classes: class names the labels index (default: the data's ``classes`` attribute, else
            "0", "1", ...).
        num_classes: at least this many classes (a model's outputs: labels may not use all).
        data_dir, split: for a registry name.
        limit: a seeded class-balanced subset of this many examples.
        image_size: for a registry name, the size its images are made.
        name: how results call the data (default: its type).
    """
    if isinstance(data, str):
        return build_dataset(data, data_dir, split, limit=limit, seed=seed, image_size=image_size,
                             classes=classes, asked=image_size is not None)
    if data_dir is not None:
        raise FastablateError(f"data_dir={data_dir!r} applies to a dataset name, not to {type(data).__name__}")
    if isinstance(data, ImageSet):
        ds = data
    else:
        x, y, found = _tensors(data)
        names = list(classes or found or [])
        k = max(len(names), num_classes or 0, int(y.max()) + 1 if y.numel() else 0)
        names = names + [str(i) for i in range(len(names), k)]
        mean, std = image_stats(x if x.dtype == torch.uint8 else (x * 255).round().to(torch.uint8))
        ds = ImageSet(name or type(data).__name__, split, y, names, mean, std, x.shape[-1], True, x.contiguous())
    if num_classes is not None and num_classes > ds.num_classes:
        ds = replace(ds, classes=list(ds.classes) + [str(i) for i in range(ds.num_classes, num_classes)])
    if limit is not None:
        ds = ds.subset(balanced_subset(ds.labels, limit, seed))
    return ds


def _tensors(data: Any) -> tuple[Tensor, Tensor, list[str] | None]:
    """(images, labels, class names or None) of a pair, Dataset or DataLoader, checked."""
    from torch.utils.data import DataLoader, Dataset

    classes = getattr(getattr(data, "dataset", data), "classes", None)
    if isinstance(data, (tuple, list)):
        if not (len(data) == 2 and all(isinstance(t, Tensor) for t in data)):
            raise FastablateError(f"data is a {type(data).__name__} of {len(data)} items: expected {ACCEPTED}")
        x, y = data
    elif isinstance(data, DataLoader):
        xs, ys = [], []
        for i, batch in enumerate(data):
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor)):
                raise FastablateError(f"DataLoader batch {i} is a {type(batch).__name__}, not (images, labels)")
            xs.append(batch[0])
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise FastablateError("the DataLoader gives no batches")
        x, y = torch.cat(xs), torch.cat(ys)
    elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        items = [data[i] for i in range(len(data))]
        if not items:
            raise FastablateError("the Dataset is empty")
        x = torch.stack([_image(item, i) for i, item in enumerate(items)])
        y = torch.as_tensor([_label(item, i) for i, item in enumerate(items)])
    else:
        raise FastablateError(f"data of type {type(data).__name__}: expected {ACCEPTED}")
    return _checked(x, y), y.long().cpu(), list(map(str, classes)) if classes is not None else None


def _image(item: Any, i: int) -> Tensor:
    if not (isinstance(item, (tuple, list)) and len(item) >= 2):
        raise FastablateError(f"Dataset item {i} is a {type(item).__name__}, not (image, label)")
    img = item[0]
    if not isinstance(img, Tensor):
        try:  # a PIL image
            from torchvision.transforms.v2.functional import pil_to_tensor

            img = pil_to_tensor(img.convert("RGB"))
        except Exception:
            raise FastablateError(f"Dataset item {i}: its image is a {type(img).__name__}, not a tensor or a PIL "
                                  "image") from None
    return img


def _label(item: Any, i: int) -> int:
    """The class index of a Dataset item: an integer (a soft label, a float or a bool is refused)."""
    label = item[1]
    if isinstance(label, Tensor) and label.numel() == 1:
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):  # numpy's integers are Integral
        raise FastablateError(f"Dataset item {i}: its label {label!r} is not an integer class index")
    return int(label)


def _checked(x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().cpu()
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise FastablateError(f"images of shape {tuple(x.shape)}: expected (N, C, H, W) with H == W")
    if x.shape[0] == 0:
        raise FastablateError("the data holds no images")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point() or y.dtype == torch.bool:
        raise FastablateError(f"labels of shape {tuple(y.shape)} and dtype {y.dtype}: expected {x.shape[0]} integer "
                              "class indices")
    if y.numel() and int(y.min()) < 0:
        raise FastablateError(f"label {int(y.min())}: class indices start at 0")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise FastablateError(f"images of dtype {x.dtype}: expected floats in [0, 1] or uint8")
    lo, hi = (float(v) for v in x.aminmax())
    if lo < 0 or hi > 1 or x.isnan().any():
        raise FastablateError(f"images range over [{lo:.3g}, {hi:.3g}]: inputs live in [0, 1]; pass the "
                              "normalization as mean=/std= (or make it part of the model), not in the data")
    return x.float()
