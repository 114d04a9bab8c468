"""The cover-image manifest: which items have a cover file and whether it decodes.

Paths are stored relative to the data folder (``item_images/<id>.jpg``), so the manifest's bytes do
not change when the data folder moves; readers resolve them with :func:`resolve_image_paths`."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl

from mmctr_assets.lib.data.microlens import IMAGES_DIR


def image_manifest(data_dir: str | os.PathLike, item_ids: np.ndarray, workers: int = 8) -> pl.DataFrame:
    """One row per item: its cover path (relative to ``data_dir``), whether the file exists and
    whether it decodes."""
    from PIL import Image

    rel = [f"{IMAGES_DIR}/{i}.jpg" for i in item_ids.tolist()]
    paths = [str(Path(data_dir) / p) for p in rel]

    def probe(p: str) -> tuple[bool, bool]:
        if not os.path.isfile(p):
            return False, False
        try:
            with Image.open(p) as im:
                im.load()
            return True, True
        except Exception:  # PIL raises a zoo of errors for broken files; all mean "not decodable"
            return True, False

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(probe, paths, chunksize=256))
    exists, decodable = zip(*results) if results else ((), ())
    return pl.DataFrame(
        {
            "item_id": pl.Series(item_ids, dtype=pl.Int64),
            "image_path": rel,
            "exists": pl.Series(exists, dtype=pl.Boolean),
            "decodable": pl.Series(decodable, dtype=pl.Boolean),
        }
    )


def resolve_image_paths(manifest: pl.DataFrame, data_dir: str | os.PathLike) -> pl.DataFrame:
    """The manifest with ``image_path`` made absolute against ``data_dir`` (absolute paths, as
    older manifests stored them, are kept as they are)."""
    root = str(Path(data_dir)).rstrip("/") + "/"
    path = pl.col("image_path")
    return manifest.with_columns(
        pl.when(path.str.starts_with("/")).then(path).otherwise(pl.lit(root) + path).alias("image_path"))
