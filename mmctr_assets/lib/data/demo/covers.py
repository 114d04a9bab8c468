"""The demo's cover images: topic colours and shapes plus noise, JPEG-encoded in parallel
batches; some deliberately missing or corrupt."""

from __future__ import annotations

import colorsys
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mmctr_assets.lib.data.demo.config import _IMAGE_BATCH, _STREAM_BROKEN, _STREAM_IMAGES, DemoSize, _rng
from mmctr_assets.lib.data.demo.items import _Items


def _topic_palette(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground RGB (0..1) per topic; topics sharing a shape get distant hues."""
    t = np.arange(k)
    hues = ((t // 4 + 0.37 * (t % 4)) / -(-k // 4)) % 1.0
    bg = np.array([colorsys.hsv_to_rgb(h, 0.35, 0.9) for h in hues], dtype=np.float32)
    fg = np.array([colorsys.hsv_to_rgb((h + 0.5) % 1.0, 0.85, 0.55) for h in hues], dtype=np.float32)
    return bg, fg


def _cover_batch(topic: np.ndarray, size: int, rng: np.random.Generator,
                 palette: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """uint8 (B, S, S, 3) covers: topic colours and topic shape (circle/square/diamond/ring) + noise."""
    b = len(topic)
    bg = palette[0][topic] + rng.normal(0, 0.07, (b, 3)).astype(np.float32)
    fg = palette[1][topic] + rng.normal(0, 0.07, (b, 3)).astype(np.float32)
    cy, cx = (size * rng.uniform(0.3, 0.7, (2, b))).astype(np.float32)[:, :, None, None]
    r = (size * rng.uniform(0.2, 0.32, b)).astype(np.float32)[:, None, None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = np.abs(yy[None] - cy), np.abs(xx[None] - cx)
    dist = np.sqrt(dx**2 + dy**2)
    shape = (topic % 4)[:, None, None]
    mask = np.select(
        [shape == 0, shape == 1, shape == 2],
        [dist < r, np.maximum(dx, dy) < 0.85 * r, dx + dy < 1.2 * r],
        (dist < r) & (dist > 0.55 * r))
    img = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :])
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= 0.05
    img += noise
    img *= 255
    img += 0.5
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


def _write_images(folder: Path, size: DemoSize, items: _Items, seed: int, skip: np.ndarray,
                  progress: bool) -> None:
    """One task per batch of covers (numpy and JPEG encoding release the GIL); own RNG per batch."""
    folder.mkdir()
    palette = _topic_palette(size.n_topics)
    skip_set = np.zeros(size.n_items + 1, dtype=bool)
    skip_set[skip] = True
    ids = np.arange(1, size.n_items + 1)

    def write_batch(i: int) -> None:
        batch = ids[i * _IMAGE_BATCH:(i + 1) * _IMAGE_BATCH]
        pixels = _cover_batch(items.topic[batch], size.image_size, _rng(seed, _STREAM_IMAGES, i), palette)
        for item_id, px in zip(batch[~skip_set[batch]].tolist(), pixels[~skip_set[batch]]):
            buf = io.BytesIO()  # one write per file: much faster than PIL's buffered file writes
            Image.fromarray(px).save(buf, format="JPEG", quality=size.jpeg_quality)
            (folder / f"{item_id}.jpg").write_bytes(buf.getvalue())

    n_batches = -(-len(ids) // _IMAGE_BATCH)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(tqdm(pool.map(write_batch, range(n_batches)), total=n_batches, desc="item_images",
                  unit="batch", disable=not progress))


def _break_images(folder: Path, corrupt: np.ndarray, seed: int) -> None:
    """Half the corrupt files become truncated JPEGs, the other half random bytes."""
    rng = _rng(seed, _STREAM_BROKEN, 1)
    for i, item_id in enumerate(corrupt.tolist()):
        path = folder / f"{item_id}.jpg"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3] if i % 2 == 0 else rng.bytes(len(data)))
