"""Saved adversarial sets (``attack --save-dataset``): what they hold, and disjoint parts.

A set is a dict: uint8 ``images`` (N, C, H, W), ``labels``, ``index`` (each example's image
in its source split), ``classes``, ``attack`` (the resolved attack options), ``model``,
``dataset``, ``split``. ``fastablate data split`` cuts one into disjoint parts
(stratified by class: every part holds each class in the same share, as far as the counts
allow), ``fastablate data info`` says what one holds.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
from torch import Tensor

from fastablate.data import read_saved
from fastablate.errors import FastablateError, note

PER_EXAMPLE = ("images", "labels", "index")


def read_set(path: str) -> dict:
    """The saved set at ``path`` (either layout; the first one cut to its successful examples)."""
    obj = read_saved(path, "")
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), Tensor) or \
            not isinstance(obj.get("labels"), Tensor) or obj["labels"].shape != obj["images"].shape[:1]:
        raise FastablateError(f"{path}: not a saved adversarial set (images and labels, as attack --save-dataset "
                              "writes)")
    success = obj.get("success")
    if isinstance(success, Tensor) and success.shape == obj["labels"].shape:  # the first layout
        keep = success.bool()
        note(f"{path} holds every image of its split (the first --save-dataset layout); using its "
             f"{int(keep.sum())} successful adversarial examples")
        obj = {**{k: v for k, v in obj.items() if k not in ("success", "attacked")},
               "images": obj["images"][keep], "labels": obj["labels"][keep],
               "index": keep.nonzero().squeeze(1)}
    return obj


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

    from fastablate.models.checkpoint import atomic_save

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
