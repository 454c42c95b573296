"""Image files: listing, decoding, and the image-size policy of file-backed datasets.

Policy, for every file-backed dataset (imagefolder, tinyimagenet):
- Entries whose names start with ``.`` (macOS's ``._*`` files, ``.DS_Store``) and folders are
  not images: they are skipped, and a note counts them.
- A file with an image extension that does not decode (truncated, not an image, empty) is an
  error naming the file: a dataset is never silently smaller than its folders.
- 16-bit images are reduced to 8 bits, gray and gray+alpha images become RGB, alpha is dropped.
- The image size is the model's (a checkpoint's ``image_size``, or the training split's) when
  known, else the most common size among the files; images of another size are resized to
  it (squares; a note counts them). One odd image never changes the size of the others.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

from fastablate.errors import FastablateError, note
from fastablate.files import parse_size

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
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


def list_images(folder: Path, skipped: list[str]) -> list[Path]:
    """The image files in ``folder``, sorted; hidden entries and folders go to ``skipped``."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if p.name.startswith(".") or not p.is_file():
            skipped.append(str(p))
            continue
        out.append(p)
    return out


def note_skipped(skipped: list[str], where: str) -> None:
    if skipped:
        note(f"skipped {len(skipped)} hidden files or folders with image names in {where} (e.g. {skipped[0]}): "
             "they are not images")


def _reason(e: Exception) -> str:
    """The readable end of a decoder's message ('decode_jpeg, <file>:171, Image is truncated')."""
    return str(e).splitlines()[0].rsplit(", ", 1)[-1] if str(e) else type(e).__name__


def decode(path: str, size: int | None = None) -> Tensor:
    """(3, H, W) uint8 RGB image of ``path``, resized to ``size`` x ``size`` when given."""
    import warnings

    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2.functional import resize

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io's decoders, still the fastest
            img = decode_image(read_file(path), mode=ImageReadMode.UNCHANGED)
    except (RuntimeError, ValueError) as e:
        raise FastablateError(f"{path} is not a readable image ({_reason(e)})") from None
    if img.dtype != torch.uint8:  # 16-bit PNG: keep the high byte
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    channels = img.shape[0]
    if channels in (1, 2):
        img = img[:1].expand(3, -1, -1)
    elif channels == 4:
        img = img[:3]
    elif channels != 3:
        raise FastablateError(f"{path} has {channels} channels; expected gray, RGB or RGBA")
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


def choose_size(files: list[str], image_size: int | None, where: str) -> int:
    """The policy above: ``image_size`` if given, else the most common size; a note counts the
    images that will be resized."""
    sizes = image_sizes(files)
    if image_size is None:
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
