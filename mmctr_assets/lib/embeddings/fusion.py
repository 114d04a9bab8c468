"""Fuse content (CLIP) and collaborative (item2vec) vectors into one 128-d unit vector per item.

CLIP's 512 dimensions are reduced to 128 by PCA fitted on real items only, so padding or
missing-image zero rows cannot pull the principal axes. Both parts are L2-normalised before
mixing, so ``alpha`` weighs directions, not whichever model happens to have larger norms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from mmctr_assets.lib.io import atomic_path

EMB_COLUMN = "item_emb_d128"
_EPS = 1e-12


@dataclass(frozen=True)
class FusionResult:
    embeddings: np.ndarray  # float32 [n_items + 1, dim]; row i is item i, row 0 (padding) zero
    explained_variance_ratio: np.ndarray  # per PCA component of the content part
    explained_variance_total: float
    counts: dict  # both / content_only / collab_only / none (items 1..n_items)
    pca_components: int  # < dim only when there are fewer content items or dims than dim


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > _EPS)


def _scatter(ids, emb, n_items: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Place rows by item id into an [n_items+1, d] table; return it and the has-vector mask."""
    ids = np.asarray(ids, dtype=np.int64).ravel()
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise ValueError(f"{name}: {len(ids)} ids but embeddings of shape {emb.shape}; they must align.")
    if len(ids) and (ids.min() < 0 or ids.max() > n_items):
        bad = ids[(ids < 0) | (ids > n_items)][:5].tolist()
        raise ValueError(f"{name}: item ids outside 0..{n_items} (n_items from item_info), e.g. {bad}. "
                         "Were the embeddings built from a different dataset?")
    if len(np.unique(ids)) != len(ids):
        uniq, cnt = np.unique(ids, return_counts=True)
        raise ValueError(f"{name}: item ids repeated, e.g. {uniq[cnt > 1][:5].tolist()}; one row per item.")
    if not np.isfinite(emb).all():
        bad = ids[~np.isfinite(emb).all(axis=1)][:5].tolist()
        raise ValueError(f"{name}: NaN/inf in the vectors of items {bad}; recompute that asset.")
    table = np.zeros((n_items + 1, emb.shape[1]), dtype=np.float32)
    table[ids] = emb
    has = np.linalg.norm(table, axis=1) > _EPS
    has[0] = False  # padding is never a real item
    return table, has


def fuse_embeddings(
    n_items: int,
    clip_ids,
    clip_emb,
    i2v_ids,
    i2v_emb,
    *,
    alpha: float = 0.5,
    dim: int = 128,
    seed: int = 0,
    on_missing: str = "raise",
) -> FusionResult:
    """``normalise(alpha * content + (1 - alpha) * collab)`` per item, PCA'd content to ``dim``.

    An item with only one part uses that part alone (unit norm). An item with neither raises
    (``on_missing="raise"``, the default: a silent zero vector would look like padding to the
    CTR model) or, with ``on_missing="zero"``, keeps a zero row and is counted as ``none``.
    If fewer than ``dim`` content items (or dims) exist, PCA keeps what it can and the remaining
    columns are zero; ``pca_components`` says how many were fitted.
    """
    from sklearn.decomposition import PCA

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (weight of the content part), got {alpha}.")
    if on_missing not in ("raise", "zero"):
        raise ValueError(f"on_missing must be 'raise' or 'zero', got {on_missing!r}.")
    clip, has_c = _scatter(clip_ids, clip_emb, n_items, "CLIP embeddings")
    collab, has_k = _scatter(i2v_ids, i2v_emb, n_items, "item2vec embeddings")
    if collab.shape[1] != dim:
        raise ValueError(f"item2vec vectors are {collab.shape[1]}-d but the fused embedding is {dim}-d; "
                         f"train item2vec with dim={dim}.")

    content = np.zeros((n_items + 1, dim), dtype=np.float32)
    ratio = np.zeros(0, dtype=np.float64)
    k = min(dim, int(has_c.sum()), clip.shape[1])
    if k >= 1:
        # covariance_eigh: exact and fast for many items x 512 dims (eigh of a 512x512 matrix)
        pca = PCA(n_components=k, svd_solver="covariance_eigh", random_state=seed)
        content[has_c, :k] = pca.fit_transform(clip[has_c])
        ratio = pca.explained_variance_ratio_
    content, collab = _normalise(content), _normalise(collab)

    both = has_c & has_k
    w_c = np.where(both, alpha, has_c.astype(np.float64))
    w_k = np.where(both, 1.0 - alpha, has_k.astype(np.float64))
    fused = w_c[:, None] * content + w_k[:, None] * collab
    # alpha mixes of opposite vectors could cancel; fall back to the content direction then
    degenerate = both & (np.linalg.norm(fused, axis=1) <= 1e-6)
    fused[degenerate] = content[degenerate]
    fused = _normalise(fused.astype(np.float32))
    fused[0] = 0.0

    none = ~(has_c | has_k)
    none[0] = False
    if none.any() and on_missing == "raise":
        ids = np.flatnonzero(none)
        raise ValueError(
            f"{len(ids)} items have neither a CLIP nor an item2vec vector (e.g. {ids[:10].tolist()}). "
            "Materialise every clip_embeddings shard (the CLIP encoder covers every item in "
            "item_info), or pass on_missing='zero' to keep zero rows."
        )
    counts = {
        "both": int(both.sum()),
        "content_only": int((has_c & ~has_k).sum()),
        "collab_only": int((has_k & ~has_c).sum()),
        "none": int(none.sum()),
    }
    return FusionResult(fused, ratio, float(ratio.sum()), counts, k)


def write_item_info_updated(
    item_info_path: str | os.PathLike, embeddings: np.ndarray, out_path: str | os.PathLike
) -> Path:
    """Copy item_info with ``item_emb_d128`` replaced, keeping its exact schema (types, order,
    nullability, metadata); written atomically. ``embeddings`` row i must be item i, row 0 zero."""
    src = pq.read_table(item_info_path)
    for col in ("item_id", EMB_COLUMN):
        if col not in src.column_names:
            raise ValueError(f"{item_info_path} has no {col!r} column (columns: {src.column_names}).")
    ids = src["item_id"].to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise ValueError(f"{item_info_path}: item_id must equal the row index 0..N (row 0 = padding); "
                         "fix the source item_info first.")
    emb = np.asarray(embeddings)
    field = src.schema.field(EMB_COLUMN)
    width = field.type.list_size if pa.types.is_fixed_size_list(field.type) else None
    if width is None:
        lengths = pc_list_lengths(src[EMB_COLUMN])
        width = int(lengths.max()) if len(lengths) else emb.shape[1]
    if emb.shape != (len(ids), width):
        raise ValueError(f"embeddings have shape {emb.shape} but {item_info_path} needs "
                         f"({len(ids)}, {width}): one {width}-d row per item_info row.")
    if np.any(emb[0] != 0):
        raise ValueError("embeddings row 0 (the padding item) must be all zeros.")

    value_type = field.type.value_type
    flat = pa.array(emb.astype(value_type.to_pandas_dtype(), copy=False).ravel(), type=value_type)
    if pa.types.is_fixed_size_list(field.type):
        column = pa.FixedSizeListArray.from_arrays(flat, width)
    else:
        offsets = np.arange(0, len(flat) + 1, width, dtype=np.int64)
        list_cls = pa.LargeListArray if pa.types.is_large_list(field.type) else pa.ListArray
        if list_cls is pa.ListArray:
            offsets = offsets.astype(np.int32)
        column = list_cls.from_arrays(pa.array(offsets), flat)
    column = column.cast(field.type)
    table = src.set_column(src.schema.get_field_index(EMB_COLUMN), field, column)
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp)
    return Path(out_path)


def pc_list_lengths(col: pa.ChunkedArray) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(col).fill_null(0).to_numpy()


def _frame_to_matrix(frame: pl.DataFrame, column: str | None, problems: list[str]):
    if "item_id" not in frame.columns:
        problems.append(f"no item_id column (columns: {frame.columns}).")
        return None, None
    candidates = [column] if column else [
        c for c, t in frame.schema.items() if isinstance(t, (pl.List, pl.Array)) and c != "item_tags"
    ]
    if not candidates or candidates[0] not in frame.columns:
        problems.append(f"no embedding column found (columns: {frame.columns}); pass column=.")
        return None, None
    col = frame[candidates[0]]
    lengths = col.list.len() if isinstance(col.dtype, pl.List) else None
    if lengths is not None and (lengths.null_count() or lengths.n_unique() != 1):
        bad = frame.filter(lengths.ne_missing(lengths.mode().first()))["item_id"].head(5).to_list()
        problems.append(f"{candidates[0]}: rows of different lengths or nulls, e.g. items {bad}.")
        return None, frame["item_id"].to_numpy()
    if lengths is not None:
        col = col.cast(pl.Array(pl.Float64, int(lengths[0]) if len(lengths) else 0))
    return col.to_numpy().astype(np.float64, copy=False), frame["item_id"].to_numpy()


def validate_item_embeddings(
    data: np.ndarray | pl.DataFrame,
    *,
    dim: int = 128,
    n_items: int | None = None,
    column: str | None = None,
    atol: float = 1e-3,
) -> list[str]:
    """Every problem that makes an item-embedding table unusable as item_emb_d128 (empty = fine).

    ``data`` is an [n_items+1, dim] array (row = item id) or a frame with ``item_id`` and a
    list/array embedding column. Checks: width == dim, row index == item_id, ids 0..n_items each
    once, finite values, row 0 zero, unit norm on every real item.
    """
    problems: list[str] = []
    if isinstance(data, pl.DataFrame):
        emb, ids = _frame_to_matrix(data, column, problems)
        if ids is not None:
            rows = np.arange(len(ids))
            if not np.array_equal(ids, rows):
                first = int(np.flatnonzero(ids != rows)[0]) if len(ids) == len(rows) else 0
                problems.append(f"row index != item_id (first at row {first}, item_id {ids[first]}); "
                                "sort by item_id with one row per id 0..N.")
            uniq, cnt = np.unique(ids, return_counts=True)
            if (cnt > 1).any():
                problems.append(f"item ids repeated: {uniq[cnt > 1][:5].tolist()}.")
            expected = n_items if n_items is not None else (int(ids.max()) if len(ids) else 0)
            missing = np.setdiff1d(np.arange(expected + 1), uniq)
            if len(missing):
                problems.append(f"{len(missing)} item ids of 0..{expected} have no row, e.g. {missing[:5].tolist()}.")
            extra = uniq[(uniq < 0) | (uniq > expected)]
            if len(extra):
                problems.append(f"item ids outside 0..{expected}: {extra[:5].tolist()}.")
        if emb is None:
            return problems
        ids = ids if ids is not None else np.arange(len(emb))
    else:
        emb = np.asarray(data, dtype=np.float64)
        ids = np.arange(len(emb))
        if emb.ndim != 2:
            return [f"embeddings must be a 2-D [n_items+1, {dim}] array, got shape {emb.shape}."]
        if n_items is not None and len(emb) != n_items + 1:
            problems.append(f"{len(emb)} rows but item_info has {n_items + 1} (items 0..{n_items}).")

    if emb.ndim != 2 or emb.shape[1] != dim:
        problems.append(f"embeddings are {emb.shape[1] if emb.ndim == 2 else emb.shape}-d, expected {dim}.")
    if len(emb) == 0:
        return problems + ["no rows."]
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        problems.append(f"{int((~finite).sum())} rows hold NaN/inf, e.g. items {ids[~finite][:5].tolist()}.")
    pad = ids == 0
    if pad.any() and np.any(emb[pad] != 0):
        problems.append("row of item 0 (padding) is not all zeros.")
    norms = np.linalg.norm(np.where(finite[:, None], emb, 0.0), axis=1)
    off = finite & ~pad & (np.abs(norms - 1.0) > atol)
    if off.any():
        problems.append(f"{int(off.sum())} real items are not unit norm (|norm-1| > {atol}), e.g. items "
                        f"{ids[off][:5].tolist()} with norms {np.round(norms[off][:5], 4).tolist()}.")
    return problems
