"""Hostile data folders: crafted CIFAR pickles, every PIL image mode and the file types
torchvision's ImageFolder reads, extensions that are not images."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from test_hostile import folder, ok, refused

from fastablate.data import build_dataset
from fastablate.models import build_model, save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "r8.pt"
    save_checkpoint(build_model("resnet8", 10), path)
    return path


# --- CIFAR's python batches ------------------------------------------------------------------
def _cifar_folder(root, test_batch=None):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(10)) * (n // 10),
                "batch_label": "b", "filenames": [f"{i}.png" for i in range(n)]}
    for i in range(1, 6):
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(batch(20), protocol=2))
    (base / "test_batch").write_bytes(test_batch if test_batch is not None else pickle.dumps(batch(20)))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return root


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_cifar_batches_are_read_without_running_code(ckpt, tmp_path):
    marker = tmp_path / "ran"
    data = _cifar_folder(tmp_path / "c", pickle.dumps({"data": _Payload(marker), "labels": [0]}))
    refused(["eval", "--weights", ckpt, "--dataset", "cifar10", "--data-dir", data,
             "--out", tmp_path / "o"], "test_batch': it names posix.system, which a CIFAR batch never holds",
            protect=[data], out=tmp_path / "o")
    assert not marker.exists()
    with pytest.raises(ValueError, match="posix.system"):
        build_dataset("cifar10", str(data), "test")
    assert not marker.exists()
    # Genuine batches, whichever pickle protocol wrote them, load.
    assert len(build_dataset("cifar10", str(data), "train")) == 100


def test_cifar_batch_of_the_wrong_shape(tmp_path):
    data = _cifar_folder(tmp_path / "c", pickle.dumps({"data": np.zeros((3, 10), np.uint8), "labels": [0, 1, 2]}))
    with pytest.raises(ValueError, match="does not hold uint8 rows of 3072 values"):
        build_dataset("cifar10", str(data), "test")
    (data / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(["not", "a", "dict"]))
    with pytest.raises(ValueError, match="is not a CIFAR batch"):
        build_dataset("cifar10", str(data), "test")


# --- every image mode, as torchvision's ImageFolder reads it --------------------------------------
def _pil_rgb(path):
    """What torchvision's ImageFolder gives for a file: its pil_loader's convert("RGB")."""
    from torchvision.datasets.folder import pil_loader
    return torch.from_numpy(np.array(pil_loader(str(path)))).permute(2, 0, 1)


def _write_modes(d, size=16):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    d.mkdir(parents=True, exist_ok=True)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    files = {
        "palette.png": lambda p: palette.save(p),
        "palette-transparent.png": lambda p: palette.save(p, transparency=3),
        "gray-alpha.png": lambda p: rgb.convert("LA").save(p),
        "rgba.png": lambda p: rgb.convert("RGBA").save(p),
        "deep.png": lambda p: Image.fromarray(rng.integers(0, 65536, (size, size)).astype(np.uint16)).save(p),
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p),
        "gray.jpg": lambda p: rgb.convert("L").save(p),
        "rgb.tif": lambda p: rgb.save(p),
        "palette.tiff": lambda p: palette.save(p),
        "rgb.bmp": lambda p: rgb.save(p),
        "palette.bmp": lambda p: palette.save(p),
        "rgb.ppm": lambda p: rgb.save(p),
        "gray.pgm": lambda p: rgb.convert("L").save(p),
        "rgb.webp": lambda p: rgb.save(p, lossless=True),
        "upper.PNG": lambda p: rgb.save(p, format="PNG"),
    }
    for name, write in files.items():
        write(d / name)
    return sorted(files)


def test_every_mode_and_file_type_decodes_to_imagefolder_s_pixels(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTABLATE_MEMORY_LIMIT", "1")  # keep the file list: decoded per batch
    data = folder(tmp_path / "d", per=2)
    names = _write_modes(data / "train" / "a")
    ds = build_dataset("imagefolder", str(data), "train")
    files = [f for f in ds.files if f.split("/")[-1] in names]
    assert sorted(f.split("/")[-1] for f in files) == names  # none left out
    index = torch.tensor([ds.files.index(f) for f in files])
    for f, img in zip(files, ds.load(index)):
        assert torch.equal(img, _pil_rgb(f)), f  # the same pixels, not palette indices shown as gray


def test_palette_pngs_give_the_pixels_of_their_rgb_twins(tmp_path):
    """A set of palette PNGs loads as the very pixels of the same images saved as RGB."""
    src = folder(tmp_path / "rgb", per=6)
    pal = tmp_path / "pal"
    for f in src.rglob("*.png"):
        out = pal / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        im = Image.open(f).convert("RGB").quantize(256)
        im.save(out)
        im.convert("RGB").save(f)  # the RGB set holds the very pixels of the palette set
    a = build_dataset("imagefolder", str(src), "test")
    b = build_dataset("imagefolder", str(pal), "test")
    assert torch.equal(a.load(torch.arange(len(a))), b.load(torch.arange(len(b))))


def test_other_extensions_are_counted_and_an_empty_class_is_an_error(tmp_path):
    data = folder(tmp_path / "d")
    (data / "train" / "a" / "notes.txt").write_text("not an image")
    Image.new("RGB", (16, 16)).save(data / "train" / "b" / "anim.gif")
    r = ok(["train", "--model", "resnet8", "--dataset", "imagefolder", "--data-dir", data, "--epochs", "1",
            "--batch-size", "4", "--out", tmp_path / "o"])
    assert "left out 2 files in" in r.stderr and "that are not images by their extension (1 " in r.stderr
    assert ".gif" in r.stderr and ".txt" in r.stderr
    # A class of GIFs only would silently vanish: an error.
    for f in (data / "test" / "b").iterdir():
        f.unlink()
    Image.new("RGB", (16, 16)).save(data / "test" / "b" / "only.gif")
    refused(["train", "--model", "resnet8", "--dataset", "imagefolder", "--data-dir", data, "--out",
             tmp_path / "o2"], f"class folder '{data / 'test' / 'b'}' holds no image", protect=[data],
            out=tmp_path / "o2")


def test_a_class_of_tiffs_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTABLATE_MEMORY_LIMIT", "1")
    data = folder(tmp_path / "d")
    for split in ("train", "test"):
        for f in sorted((data / split / "b").iterdir()):
            Image.open(f).save(f.with_suffix(".tif"))
            f.unlink()
    ds = build_dataset("imagefolder", str(data), "train")
    assert ds.classes == ["a", "b"] and (ds.labels == 1).sum() == 4
    tif = torch.tensor([i for i, f in enumerate(ds.files) if f.endswith(".tif")])
    assert all(torch.equal(img, _pil_rgb(ds.files[i])) for i, img in zip(tif.tolist(), ds.load(tif)))
