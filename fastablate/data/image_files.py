"""Image files: listing, decoding, and the image-size policy of file-backed datasets.

Policy, for every file-backed dataset (imagefolder, tinyimagenet):
- Images are the files torchvision's ImageFolder reads (jpg, jpeg, png, ppm, bmp, pgm, tif,
  tiff, webp, any case), decoded to RGB with its pixels: PIL's ``convert("RGB")`` (palette
  images through their palette, gray and gray+alpha replicated, alpha dropped, CMYK
  converted, 16-bit clipped as PIL clips). JPEG, PNG and WebP take torchvision's faster
  decoders, which give the same pixels.
- Entries whose names start with ``.`` (macOS's ``._*`` files, ``.DS_Store``) and folders are
  not images: they are skipped, and a note counts them. Files of another extension (a .gif,
  a .txt) are left out with a note that counts them by extension; a class folder left with
  no image is an error.
- A file with an image extension that does not decode (truncated, not an image, empty) is an
  error naming the file: a dataset is never silently smaller than its folders.
- Files are decoded at the most common size among them; images of another size are resized
  to it (squares; a note counts them). One odd image never changes the size of the others.
  The model's size (``--image-size``, a checkpoint's, or the training split's) is made per
  batch on the device.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

from fastablate.errors import FastablateError, note
from fastablate.files import parse_size

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
MEMORY_LIMIT_VAR = "FASTABLATE_MEMORY_LIMIT"


def memory_limit() -> int:
    """Bytes of decoded images held in memory (``FASTABLATE_MEMORY_LIMIT``, default 8 GiB)."""
    text = os.environ.get(MEMORY_LIMIT_VAR)
    if text is None:
        return 8 << 30
    try:
        return parse_size(text)
    except ValueError as e:
        raise FastablateError(f"{MEMORY_LIMIT_VAR}={text!r}: {e}") from None


def list_images(folder: Path, skipped: list[str], other: Counter | None = None) -> list[Path]:
    """The image files in ``folder``, sorted; hidden entries and folders with image names go to
    ``skipped``, and the extensions of other visible files are counted in ``other``."""
    out = []
    with os.scandir(folder) as it:  # names and types from the directory listing: no stat per file
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        suffix = os.path.splitext(e.name)[1].lower()
        if suffix not in IMAGE_EXTENSIONS:
            if other is not None and not e.name.startswith(".") and e.is_file():
                other[suffix or "(none)"] += 1
            continue
        if e.name.startswith(".") or not e.is_file():
            skipped.append(e.path)
            continue
        out.append(folder / e.name)
    return out


def note_skipped(skipped: list[str], where: str, other: Counter | None = None) -> None:
    if skipped:
        note(f"skipped {len(skipped)} hidden files or folders with image names in {where} (e.g. {skipped[0]}): "
             "they are not images")
    if other:
        counts = ", ".join(f"{n} {ext}" for ext, n in other.most_common())
        note(f"left out {sum(other.values())} files in {where} that are not images by their extension ({counts}); "
             f"images are {' '.join(IMAGE_EXTENSIONS)}")


def _reason(e: Exception) -> str:
    """The readable end of a decoder's message ('decode_jpeg, <file>:171, Image is truncated')."""
    return str(e).splitlines()[0].rsplit(", ", 1)[-1] if str(e) else type(e).__name__


_FAST = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF")  # JPEG, PNG, WebP: torchvision's decoders


def _decode_pil(data: bytes, path: str) -> Tensor:
    import io

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.array(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise FastablateError(f"{path} is not a readable image ({str(e).splitlines()[0] if str(e) else e})") from None
    return torch.from_numpy(rgb).permute(2, 0, 1)


def decode(path: str, size: int | None = None) -> Tensor:
    """(3, H, W) uint8 RGB image of ``path`` with the pixels of PIL's ``convert("RGB")`` (the
    policy above), resized to ``size`` x ``size`` when given."""
    import warnings

    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import resize

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FastablateError(f"{path} is not a readable image ({e.strerror})") from None
    img = None
    if data.startswith(_FAST):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io's decoders, still the fastest
                img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):  # a file PIL may still read; if not, PIL says why
            img = None
    if img is None or img.dtype != torch.uint8:  # 16-bit PNGs: PIL's conversion, not torchvision's
        img = _decode_pil(data, path)
    if size is not None and (img.shape[1] != size or img.shape[2] != size):
        img = resize(img.contiguous(), [size, size], antialias=True)
    return img.contiguous()


def image_sizes(files: list[str]) -> list[tuple[int, int]]:
    """(height, width) of each file from its header (no decoding)."""
    from PIL import Image, UnidentifiedImageError

    sizes = []
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.append((im.height, im.width))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise FastablateError(f"{f} is not a readable image ({str(e).splitlines()[0] if str(e) else e})") from None
    return sizes


def choose_size(files: list[str], where: str) -> int:
    """The policy above from the files' headers: the most common size; a note counts the
    images that will be resized."""
    return common_size(image_sizes(files), files, where)


def common_size(sizes: list[tuple[int, int]], files: list[str], where: str) -> int:
    """The most common of the images' (height, width) sizes as a square side; a note counts
    the images of another size (they are resized to it)."""
    (h, w), _ = Counter(sizes).most_common(1)[0]
    image_size = h if h == w else min(h, w)
    odd = [(f, s) for f, s in zip(files, sizes) if s != (image_size, image_size)]
    if odd:
        f, (h, w) = odd[0]
        note(f"{len(odd)} of {len(files)} images in {where} are not {image_size}x{image_size} (e.g. {f}: {h}x{w}); "
             f"they are resized to {image_size}x{image_size}")
    return image_size


def image_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units."""
    x = images.float().div(255).transpose(0, 1).flatten(1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())
