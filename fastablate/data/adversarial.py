"""Saved adversarial sets (``attack --save-dataset``): what they hold, and disjoint parts.

A set is a dict: uint8 ``images`` (N, C, H, W), ``labels``, ``index`` (each example's image
in its source split), ``classes``, ``attack`` (the resolved attack options), ``model``,
``dataset``, ``split``. ``fastablate data split`` cuts one into disjoint parts
(stratified by class: every part holds each class in the same share, as far as the counts
allow), ``fastablate data info`` says what one holds.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from fastablate.data import ImageSet, read_saved, resized, with_classes
from fastablate.errors import FastablateError, note

PER_EXAMPLE = ("images", "labels", "index")


def read_set(path: str, what: str = "") -> dict:
    """The saved set at ``path``, checked as every command checks it (uint8 images (N, C, H, W),
    integer labels within its classes, one class name per class); the first layout cut to its
    successful examples, with a note. ``what`` (``"--adv-data "``) prefixes the path in errors."""
    obj = read_saved(path, what)
    where = f"{what}{path}"
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), Tensor) or \
            not isinstance(obj.get("labels"), Tensor):
        raise FastablateError(f"{where}: not a saved dataset (uint8 images (N, C, H, W) and their labels, as attack "
                              "--save-dataset writes)")
    images, labels = obj["images"], obj["labels"]
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise FastablateError(f"{where}: its images are {images.dtype} of shape {tuple(images.shape)}; a saved "
                              "dataset holds uint8 images (N, C, H, W), square, as attack --save-dataset writes")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point() or \
            labels.dtype == torch.bool or labels.is_complex():
        raise FastablateError(f"{where}: its labels are {labels.dtype} of shape {tuple(labels.shape)}; expected "
                              f"{images.shape[0]} integer class indices")
    classes = obj.get("classes")
    if classes is not None and (not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes)):
        raise FastablateError(f"{where}: its classes are not a list of names")
    if labels.numel() and (int(labels.min()) < 0 or (classes is not None and int(labels.max()) >= len(classes))):
        raise FastablateError(f"{where}: labels {int(labels.min())}..{int(labels.max())} lie outside its "
                              f"{len(classes) if classes is not None else 'non-negative'} classes")
    obj = {**obj, "labels": labels.long()}
    success = obj.get("success")
    if isinstance(success, Tensor) and success.shape == labels.shape:  # the first layout
        keep = success.bool()
        note(f"{where} holds every image of its split (the first --save-dataset layout); using its "
             f"{int(keep.sum())} successful adversarial examples")
        obj = {**{k: v for k, v in obj.items() if k not in ("success", "attacked")},
               "images": images[keep], "labels": obj["labels"][keep], "index": keep.nonzero().squeeze(1)}
    return obj


def load_saved(path: str, what: str, like: ImageSet) -> ImageSet:
    """A saved set (:func:`read_set`) as an ImageSet with the classes of ``like`` (matched by name)
    and its batches at ``like``'s image size (resized per batch, as other data is); ``what``
    (``"--adv-data "``, ``"--eval-sets x="``) prefixes the path in errors."""
    obj = read_set(path, what)
    images, labels = obj["images"], obj["labels"]
    channels = like.images.shape[1] if like.images is not None else 3
    if images.shape[1] != channels:
        raise FastablateError(f"{what}{path} holds images of {images.shape[1]} channels; {like.name}/{like.split} "
                              f"has {channels}")
    if not len(labels):
        raise FastablateError(f"{what}{path} holds no successful adversarial example")
    classes = list(obj.get("classes") or like.classes)
    ds = ImageSet(Path(path).stem, "saved", labels, classes, like.mean, like.std, images.shape[-1], like.flip,
                  images)
    return with_classes(resized(ds, like.image_size), list(like.classes), f"{like.name}/{like.split}")


def stratified_order(labels: Tensor, seed: int) -> Tensor:
    """The examples in a seeded order whose every prefix holds each class in its share of the
    whole (the j-th of a class's n examples sits at (j + 0.5) / n; ties in a random order)."""
    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))
    keys = torch.empty(labels.numel(), dtype=torch.float64)
    for c in labels.unique().tolist():
        idx = perm[labels[perm] == c]
        keys[idx] = (torch.arange(idx.numel(), dtype=torch.float64) + 0.5) / idx.numel()
    return perm[torch.argsort(keys[perm], stable=True)]


def split_set(obj: dict, parts: Sequence[int], seed: int) -> list[dict]:
    """Disjoint parts of ``parts[i]`` examples each, stratified by class: in
    :func:`stratified_order`, the first ``parts[0]`` to the first part, the next to the second, ..."""
    n = len(obj["labels"])
    if sum(parts) > n:
        raise FastablateError(f"--parts {','.join(map(str, parts))} asks for {sum(parts)} examples; the set holds "
                              f"{n}")
    order = stratified_order(obj["labels"], seed)
    out, start = [], 0
    for size in parts:
        idx = order[start:start + size].sort().values
        start += size
        out.append({**{k: v for k, v in obj.items() if k not in PER_EXAMPLE},
                    **{k: obj[k][idx] for k in PER_EXAMPLE if isinstance(obj.get(k), Tensor)},
                    "part_of": {"parts": list(parts), "seed": seed}})
    return out


def describe(obj: dict, path: str) -> list[dict]:
    """The rows ``fastablate data info`` prints: one per class, then the totals with the
    attack, its budget and the source."""
    classes = obj.get("classes") or [str(i) for i in range(int(obj["labels"].max()) + 1 if len(obj["labels"]) else 0)]
    counts = Counter(obj["labels"].tolist())
    attack = obj.get("attack") or {}
    budget = (f"k={attack['k']}" if attack.get("k") is not None else
              f"eps={attack['eps']:g}" if attack.get("eps") is not None else
              f"lam={attack['lam']:g}" if attack.get("attack") == "noise" else "")
    rows = [{"class": c, "examples": counts.get(i, 0)} for i, c in enumerate(classes)]
    rows.append({"class": "all", "examples": len(obj["labels"]), "attack": attack.get("attack", "?"),
                 "budget": budget, "model": obj.get("model", "?"),
                 "source": f"{obj.get('dataset', '?')}/{obj.get('split', '?')}",
                 "size": "x".join(map(str, obj["images"].shape[1:])), "file": path})
    return rows


def split_file(file: str, parts: str, outs: str, seed: int, force: bool = False) -> tuple[list[dict], int]:
    """``fastablate data split``: the parts of ``file`` (sizes ``"10000,1000"``) written to ``outs``
    (``"a.pt,b.pt"``), every value checked before anything is written. Returns a row per part and
    the number of examples in no part."""
    from pathlib import Path

    from fastablate.files import atomic_save

    try:
        sizes = [int(p) for p in parts.split(",")]
    except ValueError:
        raise FastablateError(f"--parts {parts!r}: give whole numbers, e.g. 10000,1000") from None
    if any(n < 1 for n in sizes):
        raise FastablateError(f"--parts {parts!r}: every part holds at least one example")
    paths = [p.strip() for p in outs.split(",")]
    if len(paths) != len(sizes) or len(set(paths)) != len(paths) or not all(paths):
        raise FastablateError(f"--out {outs!r}: give {len(sizes)} different files, one per part")
    if Path(file).resolve() in [Path(p).resolve() for p in paths]:
        raise FastablateError(f"--out {outs!r} names the input {file}; inputs are never overwritten")
    existing = [p for p in paths if Path(p).exists()]
    if existing and not force:
        raise FastablateError(f"--out {existing[0]} exists; choose another file, or --force to replace it")
    obj = read_set(file)
    pieces = split_set(obj, sizes, seed)
    for piece, path in zip(pieces, paths):
        atomic_save(piece, path)
    rows = [{"file": p, "examples": len(x["labels"]), "classes": len(x["labels"].unique())}
            for x, p in zip(pieces, paths)]
    return rows, len(obj["labels"]) - sum(sizes)
