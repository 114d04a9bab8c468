"""A 2-D picture of an embedding space, coloured by a label (topic, tag), as PNG bytes.

It lets a person see at a glance whether items of one topic cluster together; it is rendered
with matplotlib's object API (no pyplot global state, Agg canvas), so it is safe in workers.
"""

from __future__ import annotations

import io

import numpy as np


def plot_embedding_projection(
    embeddings: np.ndarray,
    labels,
    title: str,
    *,
    max_points: int = 5000,
    max_labels: int = 10,
    seed: int = 0,
) -> bytes:
    """PCA to 2-D, scatter coloured by the ``max_labels`` most frequent labels (the rest grey).

    All-zero rows (padding, missing vectors) are left out; above ``max_points`` rows a seeded
    random sample is drawn.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    emb = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    if emb.ndim != 2 or len(emb) != len(labels):
        raise ValueError(f"embeddings {emb.shape} and labels ({len(labels)}) must have one label per row.")
    keep = np.flatnonzero(np.abs(emb).sum(axis=1) > 0)
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_points, replace=False))
    emb, labels = emb[keep], labels[keep]
    if len(emb) < 2:
        raise ValueError(f"need at least 2 non-zero embeddings to project, got {len(emb)}.")

    centred = emb - emb.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    if xy.shape[1] < 2:
        xy = np.column_stack([xy, np.zeros(len(xy))])
    var = s**2
    explained = var[:2].sum() / var.sum() if var.sum() > 0 else 0.0

    uniq, counts = np.unique(labels, return_counts=True)
    top = uniq[np.argsort(-counts, kind="stable")][:max_labels]
    fig = Figure(figsize=(7, 5.5), dpi=100)
    ax = fig.add_subplot()
    other = ~np.isin(labels, top)
    if other.any():
        ax.scatter(xy[other, 0], xy[other, 1], s=4, c="lightgrey", label="other", alpha=0.5)
    cmap = colormaps["tab10" if len(top) <= 10 else "tab20"]
    for i, lab in enumerate(top):
        m = labels == lab
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(i % cmap.N), label=str(lab), alpha=0.8)
    ax.set_title(f"{title}\n{len(emb)} items, PCA 2-D ({explained:.0%} of variance)")
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.legend(loc="best", fontsize=7, markerscale=2, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
