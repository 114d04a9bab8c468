"""File output and identity: atomic writes (readers see the old file or the complete new one, never
a half-written one) and content fingerprints (what MLflow records and resumes compare)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

# below this many free bytes after a failed write, the disk is what failed (torch's zip writer, for
# one, reports a full disk only as "unexpected pos", without an errno)
DISK_FULL_MARGIN = 1 << 20


class DiskFullError(OSError):
    """A write ran out of space: the message names the file, what was written and what is free."""


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    seen = error
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(error, (OSError, RuntimeError)):  # no errno: ask the file system
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < DISK_FULL_MARGIN
    return False


def _disk_full(dest: Path, tmp: Path | None, error: BaseException) -> DiskFullError:
    """The error for a full disk, after removing the partial file ``tmp``."""
    written = _size(tmp) if tmp is not None else 0
    free = 0
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(dest.parent).free + written  # the partial file's space comes back
    if tmp is not None:
        _remove(tmp)
    previous = _size(dest)
    kept = (f"the previous {dest.name} ({_mb(previous)}) is unchanged" if dest.exists()
            else f"there was no {dest.name} before")
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on device writing {dest}: the disk filled after {_mb(written)} of the new file; about "
        f"{_mb(free)} is free on that file system. It needs more than {_mb(max(written, previous))}: free at least "
        f"that much there (or point the output folder at a larger disk) and run again. The partial file was "
        f"removed; {kept}. ({type(error).__name__}: {str(error).strip()[:200]})")


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it over ``dest`` only if the block succeeds.

    Works for files and directories. The temp path lives in the same directory so the final
    ``os.replace`` is a same-filesystem rename. Every output of the project is written through
    here, so a full disk anywhere surfaces as one DiskFullError that names the file and the space
    it needs, and never leaves a partial file.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as e:
        if _is_disk_full(e, dest.parent):
            raise _disk_full(dest, None, e) from e
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the caller creates it (as a file or a directory)
    try:
        yield tmp
        if tmp.is_dir() and dest.is_dir():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except Exception as e:
        if _is_disk_full(e, dest.parent):
            raise _disk_full(dest, tmp, e) from e
        raise
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def write_parquet_atomic(df: pl.DataFrame, dest: str | os.PathLike, **kwargs) -> Path:
    with atomic_path(dest) as tmp:
        df.write_parquet(tmp, **kwargs)
    return Path(dest)


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Content hash (blake2b-128) of a file: changes exactly when the bytes change."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def array_fingerprint(*arrays: Any) -> str:
    """Content hash of numpy arrays or torch tensors, dtype and shape included."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        if hasattr(a, "detach"):  # a torch tensor; torch itself is not imported here
            a = a.detach().cpu().numpy()
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1))
    return h.hexdigest()


def text_fingerprint(*parts: str) -> str:
    """Hash of a few fingerprints or names, in order: one id for several inputs."""
    return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()
