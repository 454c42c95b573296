"""Dataset registry: embedded digits, on-disk formats from small trees made here, --limit."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fastablate.data import balanced_subset, batches, build_dataset
from fastablate.data.augment import augment
from fastablate.errors import FastablateError


def test_digits_embedded_split():
    train, test = build_dataset("digits", split="train"), build_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.num_classes == 10 and not train.flip
    assert abs(len(test) / 1797 - 0.2) < 0.01
    # stratified: a fifth of each class (rounded down) is test
    assert torch.equal(torch.bincount(test.labels), (torch.bincount(train.labels) + torch.bincount(test.labels)) // 5)
    assert train.mean == build_dataset("digits", split="test").mean  # statistics of the train split


def test_limit_is_balanced_and_seeded():
    a = build_dataset("digits", split="train", limit=53, seed=4)
    b = build_dataset("digits", split="train", limit=53, seed=4)
    c = build_dataset("digits", split="train", limit=53, seed=5)
    assert len(a) == 53 and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    counts = torch.bincount(a.labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    with pytest.raises(FastablateError, match="--limit must be >= 1, got 0"):
        build_dataset("digits", limit=0)


def test_balanced_subset_uneven_classes():
    labels = torch.tensor([0] * 50 + [1] * 3 + [2] * 20)
    idx = balanced_subset(labels, 20, 0)
    assert torch.bincount(labels[idx]).tolist() == [9, 3, 8]


def test_batches_and_augmentation():
    ds = build_dataset("synthetic", split="test")
    xs = list(batches(ds, 128))
    assert [x.shape[0] for x, _ in xs] == [128, 128, 128, 116]
    assert xs[0][0].dtype == torch.float32 and 0 <= xs[0][0].min() and xs[0][0].max() <= 1
    x = ds.images[:16].float() / 255
    y = augment(x, [("crop", 4), ("flip", 0.5)], torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    assert torch.equal(augment(x, [("crop", 4), ("flip", 0.5)], torch.Generator().manual_seed(0)), y)
    # Every augmented image is a shifted (maybe flipped) crop of the zero-padded original.
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):
        found = any(torch.equal(y[i], c) or torch.equal(y[i], c.flip(-1))
                    for dy in range(9) for dx in range(9) for c in [xp[i, :, dy:dy + 32, dx:dx + 32]])
        assert found


def _write_png_tree(root: Path, split: str, classes, per_class=3, size=12):
    from torchvision.io import write_png
    for c, name in enumerate(classes):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            img = torch.full((3, size, size), 20 * c + i, dtype=torch.uint8)
            write_png(img, str(root / split / name / f"{i}.png"))


def test_imagefolder(tmp_path):
    _write_png_tree(tmp_path, "train", ["cat", "dog"])
    _write_png_tree(tmp_path, "val", ["cat", "dog"], per_class=2)
    train = build_dataset("imagefolder", tmp_path, "train")
    test = build_dataset("imagefolder", tmp_path, "test")  # val/ serves as test
    assert train.classes == ["cat", "dog"] and len(train) == 6 and len(test) == 4
    assert train.images.shape == (6, 3, 12, 12) and train.images[3, 0, 0, 0] == 20
    small = build_dataset("imagefolder", tmp_path, "train", image_size=8, asked=True)
    assert small.images.shape[-1] == 12 and small.image_size == 8  # stored as decoded, made 8 px per batch
    assert small.floats(torch.arange(2)).shape == (2, 3, 8, 8)
    assert next(batches(small, 4))[0].shape == (4, 3, 8, 8)


def test_imagefolder_streams_when_too_large(tmp_path, monkeypatch):
    _write_png_tree(tmp_path, "train", ["a", "b"])
    monkeypatch.setenv("FASTABLATE_MEMORY_LIMIT", "10")
    ds = build_dataset("imagefolder", tmp_path, "train")
    assert ds.images is None and len(ds.files) == 6
    x, y = next(batches(ds, 4))
    assert x.shape == (4, 3, 12, 12) and y.tolist() == [0, 0, 0, 1]
    parallel = list(batches(ds, 4, workers=2))  # decoded in two processes: the same batches
    assert [b[1].tolist() for b in parallel] == [[0, 0, 0, 1], [1, 1]] and torch.equal(parallel[0][0], x)


def test_tinyimagenet(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    (root).mkdir()
    (root / "wnids.txt").write_text("n01\nn02\n")
    from torchvision.io import write_jpeg
    for w in ("n01", "n02"):
        (root / "train" / w / "images").mkdir(parents=True)
        for i in range(2):
            write_jpeg(torch.zeros(3, 64, 64, dtype=torch.uint8), str(root / "train" / w / "images" / f"{w}_{i}.JPEG"))
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, w in enumerate(("n02", "n01", "n02")):
        write_jpeg(torch.zeros(3, 64, 64, dtype=torch.uint8), str(root / "val" / "images" / f"val_{i}.JPEG"))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines))
    train = build_dataset("tinyimagenet", tmp_path, "train")
    test = build_dataset("tinyimagenet", tmp_path, "test")
    assert len(train) == 4 and test.labels.tolist() == [1, 0, 1] and test.image_size == 64


def test_cifar_format(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / f, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 255, (10, 3072), dtype=np.uint8), "labels": list(range(10))}, fh)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    train = build_dataset("cifar10", tmp_path, "train")
    assert len(train) == 50 and train.images.shape == (50, 3, 32, 32) and train.classes[2] == "c2"
    assert len(build_dataset("cifar10", tmp_path, "test")) == 10


@pytest.mark.parametrize("name, layout", [
    ("cifar10", "data_batch_1, data_batch_2"), ("cifar100", "train, test, meta"),
    ("imagefolder", "<data-dir>/train/<class>/<image>"), ("tinyimagenet", "<data-dir>/wnids.txt")])
def test_absent_data_names_layout(tmp_path, name, layout):
    with pytest.raises(FastablateError, match=f"dataset {name}.*{layout}") as e:
        build_dataset(name, tmp_path / "nope", "train")
    assert "\n" not in str(e.value)


def test_unknown_names():
    with pytest.raises(FastablateError, match="unknown dataset 'mnist'; choose from: digits, cifar10"):
        build_dataset("mnist")
    with pytest.raises(FastablateError, match="unknown split 'dev'"):
        build_dataset("digits", split="dev")
    with pytest.raises(FastablateError, match="dataset cifar10 needs --data-dir"):
        build_dataset("cifar10")


CIFAR_JPG = Path(os.environ.get("FASTABLATE_CIFAR10_JPG", Path.home() / "data" / "cifar10-jpg"))


@pytest.mark.cifar
@pytest.mark.skipif(not (CIFAR_JPG / "test").is_dir(), reason=f"CIFAR-10 JPEG set not at {CIFAR_JPG}")
def test_cifar10_jpeg_set():
    ds = build_dataset("imagefolder", CIFAR_JPG, "test", limit=500, seed=0)
    assert ds.classes[:3] == ["airplane", "automobile", "bird"] and len(ds) == 500
    assert ds.images.shape[1:] == (3, 32, 32) and torch.bincount(ds.labels).tolist() == [50] * 10
