"""File output and identity: atomic writes (readers see the old file or the complete new one, never
a half-written one) and content fingerprints (what MLflow records and resumes compare)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it over ``dest`` only if the block succeeds.

    Works for files and directories. The temp path lives in the same directory so the final
    ``os.replace`` is a same-filesystem rename.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
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
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


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
