"""The cover-image manifest: which items have a cover file and whether it decodes."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl

from mmctr_assets.lib.data.microlens import IMAGES_DIR


def image_manifest(data_dir: str | os.PathLike, item_ids: np.ndarray, workers: int = 8) -> pl.DataFrame:
    """One row per item: its cover path, whether the file exists and whether it decodes."""
    from PIL import Image

    root = Path(data_dir) / IMAGES_DIR
    paths = [str(root / f"{i}.jpg") for i in item_ids.tolist()]

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
            "image_path": paths,
            "exists": pl.Series(exists, dtype=pl.Boolean),
            "decodable": pl.Series(decodable, dtype=pl.Boolean),
        }
    )
