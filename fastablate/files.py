"""Writing files so that a reader never sees half of one.

Every file fastablate writes (checkpoints, run.json, results, metrics) goes through
:func:`atomic_write`: the bytes go to a temporary file beside the target, are flushed to
disk, and the temporary file is renamed over the target. A killed write leaves only a
``.<name>.<random>.tmp`` file behind, which :func:`remove_stale_temporaries` deletes. A
full disk, a quota or a file-size limit (``ulimit -f``) is one error line naming the file,
and the file as it was before stays in place.
"""
from __future__ import annotations

import errno
import functools
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

TMP_SUFFIX = ".tmp"


def _file_mode() -> int:
    """The mode open() would give a new file: 0o666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_NO_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
             errno.EFBIG: "the file would exceed this process's file-size limit (ulimit -f)"}


class _Writes:
    """The file, keeping the first OSError of its writes: a writer such as torch.save may
    report a failed write as a RuntimeError of its own."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``."""
    from fastablate.errors import FastablateError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    writes = None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode())  # mkstemp makes it private (0600); outputs are not
            writes = _Writes(f)
            write(writes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = (writes.error if writes is not None else None) or e
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            kept = "is unchanged" if path.exists() else "was not written"
            raise FastablateError(f"cannot write {path}: {_NO_SPACE[cause.errno]}; {path.name} {kept}") from None
        raise
    return path


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save through :func:`atomic_write`: never a half-written file."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` left in ``folder`` (not below it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def parse_size(text: str) -> int:
    """Bytes from ``2G``, ``512M``, ``1.5GiB`` or ``1000000``; ValueError naming the problem."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in "KMGT" else t) * scale
    except ValueError:
        raise ValueError("is not a size such as 2G or 512M") from None
    if not (1 <= value < float("inf")):
        raise ValueError("is not a positive size such as 2G or 512M")
    return int(value)


def fingerprint(path: str | os.PathLike) -> str:
    """What a rerun compares to decide whether an input is the one a finished run read.

    A file: its size and a hash of its bytes (a checkpoint retrained in place, or a saved set
    written with other images, changes it; the same bytes written again do not). A folder (a
    dataset): the modification times and entry counts of it and of its sub-folders two levels
    down, which change when images or classes are added, removed or renamed (an image
    overwritten in place is not seen). A missing path: ``missing``."""
    p = Path(path)
    try:
        if p.is_file():
            st = p.stat()
            return _file_hash(str(p.resolve()), st.st_size, st.st_mtime_ns)
        if p.is_dir():
            import hashlib

            h = hashlib.blake2b(digest_size=8)
            level = [p]
            for _ in range(3):
                below = []
                for d in sorted(level):
                    entries = sorted(os.scandir(d), key=lambda e: e.name)
                    h.update(f"{d.relative_to(p)}:{d.stat().st_mtime_ns}:{len(entries)}\n".encode())
                    below += [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
                level = below
            return f"dir:{h.hexdigest()}"
    except OSError:
        pass
    return "missing"


@functools.lru_cache(maxsize=256)
def _file_hash(resolved: str, size: int, mtime_ns: int) -> str:
    """``size:hash`` of a file's bytes, read once per (path, size, modification time)."""
    import hashlib

    h = hashlib.blake2b(digest_size=12)
    with open(resolved, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return f"{size}:{h.hexdigest()}"
