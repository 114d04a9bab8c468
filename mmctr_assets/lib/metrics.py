"""CTR metrics: AUC (the challenge's score), log loss and ROC curve points, with clear input errors."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


class RocPoints(NamedTuple):
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def _check(labels, scores, *, need_both_classes: bool) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same length, got {y.size} and {s.size}")
    if y.size == 0:
        raise ValueError("labels and scores are empty: nothing to evaluate")
    bad = ~np.isfinite(s)
    if bad.any():
        raise ValueError(f"scores has {int(bad.sum())} NaN/inf values (first at index "
                         f"{int(np.argmax(bad))}); the model diverged or the input has NaNs")
    not_binary = (y != 0) & (y != 1)
    if not_binary.any():
        i = int(np.argmax(not_binary))
        raise ValueError(f"labels must be 0 or 1; {int(not_binary.sum())} are not "
                         f"(e.g. {y[i]:g} at index {i})")
    if need_both_classes and (y.min() == y.max()):
        raise ValueError(f"AUC is undefined: all {y.size} labels are {int(y[0])}. Evaluate on a "
                         "sample that contains both clicks (1) and non-clicks (0)")
    return y, s


def auc(labels, scores) -> float:
    """ROC AUC of ``scores`` against 0/1 ``labels``."""
    y, s = _check(labels, scores, need_both_classes=True)
    return float(roc_auc_score(y, s))


def logloss(labels, probabilities, *, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to ``[eps, 1 - eps]``)."""
    y, p = _check(labels, probabilities, need_both_classes=False)
    if (p < 0).any() or (p > 1).any():
        raise ValueError("logloss needs probabilities in [0, 1]; got values outside "
                         f"[{p.min():.4g}, {p.max():.4g}] (pass sigmoid(logits), not logits)")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def roc_points(labels, scores) -> RocPoints:
    """ROC curve ``(fpr, tpr, thresholds)``; collinear points are dropped so plots stay small."""
    y, s = _check(labels, scores, need_both_classes=True)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=True)
    return RocPoints(fpr, tpr, thresholds)
