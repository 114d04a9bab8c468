"""Training-curve and ROC plots as PNG bytes (Agg canvas, no pyplot global state: safe in workers)."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

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
