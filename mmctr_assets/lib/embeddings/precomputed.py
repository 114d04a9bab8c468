"""The real download's precomputed item vectors as the platform's item tables: the organisers'
txt_emb_BERT (768-d) and img_emb_CLIPRN50 (1024-d) projected to the content embedding's 512-d
(clip_embeddings with ``source: precomputed``, no encoder and no GPU), and item_emb.parquet's
128-d columns as a model's frozen item table (``embedding_source: item_emb:<column>``).

The projection is a PCA fitted on all items, not a random one: fused_item_embeddings reduces the
512-d content vectors to 128-d with PCA again, so keeping the directions of largest variance here
keeps what that step would choose; a random orthogonal projection keeps an even share of every
direction, signal and noise alike. The fit reads every item, so each shard of a partitioned run
gets the same projection.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from sklearn.decomposition import PCA

from mmctr_assets.lib.data.microlens import PRECOMPUTED_VECTORS

CONTENT_DIM = 512  # clip_embeddings' width, which fused_item_embeddings reads


def _matrix(frame: pl.DataFrame, column: str, dim: int, table: str) -> np.ndarray:
    """[rows, dim] float32 of a list column, or a clear error naming the rows that do not fit."""
    values = frame.get_column(column)
    bad = (values.list.len().fill_null(-1) != dim) | values.list.eval(
        (~pl.element().is_finite()).fill_null(True)).list.any().fill_null(True)
    if bad.any():
        ids = frame.get_column("item_id").filter(bad).head(5).to_list()
        raise ValueError(f"{table}.{column}: {int(bad.sum())} items have no {dim}-long finite vector (first "
                         f"item ids {ids}); see the raw asset's checks. Fix or re-download the file, or use "
                         "another source.")
    return values.list.to_array(dim).to_numpy().astype(np.float32, copy=False)


def project_precomputed(item_feature: pl.DataFrame, n_items: int, seed: int,
                        dim: int = CONTENT_DIM) -> tuple[np.ndarray, np.ndarray, float]:
    """(item ids 1..N, [N, dim] unit-norm float32 content vectors, explained variance share).

    Each modality is L2-normalised first (BERT and CLIP-RN50 live on different scales), the two are
    concatenated with equal weight, centred and projected by PCA; with fewer items than ``dim``
    the unused components are zero, so the 512-d contract holds on any data size."""
    missing = [c for c in PRECOMPUTED_VECTORS if c not in item_feature.columns]
    if missing:
        raise ValueError(f"clip_embeddings source: precomputed needs item_feature.parquet with {missing} "
                         "(the real download's organiser vectors); this data has none. Use source: encoder.")
    ids = pl.int_range(1, n_items + 1, eager=True, dtype=pl.Int64)
    frame = pl.DataFrame({"item_id": ids}).join(item_feature, on="item_id", how="left").sort("item_id")
    parts = []
    for column, width in PRECOMPUTED_VECTORS.items():
        m = _matrix(frame, column, width, "item_feature")
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        parts.append(m / np.maximum(norms, 1e-12) / np.sqrt(len(PRECOMPUTED_VECTORS)))
    x = np.hstack(parts)
    k = min(dim, x.shape[0], x.shape[1])
    pca = PCA(n_components=k, svd_solver="covariance_eigh", random_state=seed)
    z = np.zeros((len(x), dim), dtype=np.float32)
    z[:, :k] = pca.fit_transform(x)
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return ids.to_numpy(), z, float(pca.explained_variance_ratio_.sum())


def organiser_item_table(item_emb: pl.DataFrame, column: str, n_items: int) -> np.ndarray:
    """[N + 1, 128] float32 table of one item_emb.parquet column by item_id, row 0 (padding) zero."""
    if item_emb.height == 0:
        raise ValueError("embedding_source item_emb:... needs item_emb.parquet beside item_feature.parquet "
                         "(the real download's organiser embeddings); raw_item_emb found none. Add the file and "
                         "materialise raw_item_emb, or choose another embedding_source.")
    if column not in item_emb.columns:
        raise ValueError(f"item_emb.parquet has no column {column!r}; it has "
                         f"{[c for c in item_emb.columns if c != 'item_id']}.")
    real = item_emb.filter(pl.col("item_id") > 0)
    dim = int(real.get_column(column).list.len().max() or 0)
    table = np.zeros((n_items + 1, dim), dtype=np.float32)
    table[real.get_column("item_id").to_numpy()] = _matrix(real, column, dim, "item_emb")
    return table
