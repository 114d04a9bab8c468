"""Plots a person would rather look at than read, as PNG bytes: training curves, ROC, and a 2-D
projection of an embedding space (Agg canvas, no pyplot global state: safe in workers)."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmctr_assets.lib.metrics import auc, roc_points


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _rows(history: Sequence[Any]) -> list[Mapping[str, Any]]:
    return [dataclasses.asdict(h) if dataclasses.is_dataclass(h) else dict(h) for h in history]


def plot_training_curves(history: Sequence[Any]) -> bytes:
    """Train loss, valid AUC, valid logloss and learning rate per epoch.

    ``history`` holds ``EpochLog`` objects or dicts with ``epoch``, ``train_loss``, ``valid_auc``,
    ``valid_logloss`` and ``lr``.
    """
    rows = _rows(history)
    if not rows:
        raise ValueError("history is empty: train for at least one epoch before plotting")
    needed = ("epoch", "train_loss", "valid_auc", "valid_logloss", "lr")
    missing = [k for k in needed if k not in rows[0]]
    if missing:
        raise ValueError(f"history entries lack {missing}; expected EpochLog or dicts with {list(needed)}")
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 7))
    panels = (("train_loss", "train loss (BCE)", False), ("valid_auc", "valid AUC", False),
              ("valid_logloss", "valid logloss", False), ("lr", "learning rate", True))
    for i, (key, title, log) in enumerate(panels):
        ax = fig.add_subplot(2, 2, i + 1)
        ax.plot(epochs, [r[key] for r in rows], marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
    fig.tight_layout()
    return _png(fig)


def plot_roc(labels, scores) -> bytes:
    """ROC curve with the AUC in the legend and the chance diagonal."""
    points = roc_points(labels, scores)
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(points.fpr, points.tpr, label=f"AUC = {auc(labels, scores):.4f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


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
    return _png(fig)


def plot_trial_aucs(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Valid AUC per trial of a tuning study (a pruned trial at its last reported epoch), coloured
    by state, with the best so far as a step line. ``rows``: dicts with number, state, auc."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    colours = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red"}
    for state, colour in colours.items():
        pts = [(r["number"], r["auc"]) for r in rows if r["state"] == state and r["auc"] is not None]
        if pts:
            ax.scatter(*zip(*pts), color=colour, label=state.lower(), zorder=3)
    failed = [r["number"] for r in rows if r["state"] == "FAIL" and r["auc"] is None]
    if failed:  # no AUC to place them at: ticks on the axis
        ax.scatter(failed, [0] * len(failed), marker="x", color="tab:red", transform=ax.get_xaxis_transform(),
                   clip_on=False, label="failed (no AUC)")
    done = sorted((r["number"], r["auc"]) for r in rows if r["state"] == "COMPLETE")
    if done:
        best = np.maximum.accumulate([a for _, a in done])
        ax.step([n for n, _ in done], best, where="post", color="grey", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("valid AUC")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.tight_layout()
    return _png(fig)
