"""CTR metrics: AUC (the challenge's score), log loss, ROC curve points and DeLong's paired AUC test,
with clear input errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.stats import norm, rankdata
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


# ---------------------------------------------------------------------------- paired AUC test


@dataclass(frozen=True)
class AUCComparison:
    """DeLong's paired comparison of two scorers on the same rows: ``diff = auc_a - auc_b`` with
    its standard error (the two AUCs' correlation through the shared rows is in it)."""

    auc_a: float
    auc_b: float
    se: float
    rows: int

    @property
    def diff(self) -> float:
        return self.auc_a - self.auc_b

    def p_worse(self, margin: float = 0.0) -> float:
        """One-sided p-value of "a is worse than b by more than ``margin``" (H0: diff >= -margin):
        small when the data say a is worse. A zero standard error (identical rankings) gives 0 or 1."""
        shifted = self.diff + margin
        if self.se == 0.0:
            return 0.0 if shifted < 0 else 1.0
        return float(norm.cdf(shifted / self.se))

    def interval(self, alpha: float) -> tuple[float, float]:
        """Two-sided ``1 - 2 * alpha`` interval of diff: its upper end is the one-sided level-alpha
        bound, so ``p_worse(m) < alpha`` exactly when the upper end lies below ``-m``."""
        half = float(norm.ppf(1.0 - alpha)) * self.se
        return self.diff - half, self.diff + half


def _structural_components(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's placement values (Sun & Xu 2014: midranks, O(n log n) per scorer)."""
    m, n = len(pos), len(neg)
    rank_pos, rank_neg = rankdata(pos), rankdata(neg)
    rank_all = rankdata(np.concatenate([pos, neg]))
    auc_value = (rank_all[:m].sum() - m * (m + 1) / 2.0) / (m * n)
    v_pos = (rank_all[:m] - rank_pos) / n        # share of negatives each positive outranks
    v_neg = 1.0 - (rank_all[m:] - rank_neg) / m  # share of positives that outrank each negative
    return float(auc_value), v_pos, v_neg


def delong_test(labels, scores_a, scores_b) -> AUCComparison:
    """DeLong, DeLong & Clarke-Pearson (1988) test for two correlated ROC AUCs on the same rows,
    in Sun & Xu's fast form. Sampling noise of a validation set moves two models' AUCs together;
    the paired variance counts only what differs between them."""
    y, a = _check(labels, scores_a, need_both_classes=True)
    _, b = _check(labels, scores_b, need_both_classes=True)
    if a.shape != b.shape:
        raise ValueError(f"the two scorers must score the same rows, got {a.size} and {b.size}")
    pos, neg = y == 1, y == 0
    auc_a, pa, na = _structural_components(a[pos], a[neg])
    auc_b, pb, nb = _structural_components(b[pos], b[neg])
    cov_pos = np.cov(np.vstack([pa, pb])) if pos.sum() > 1 else np.zeros((2, 2))
    cov_neg = np.cov(np.vstack([na, nb])) if neg.sum() > 1 else np.zeros((2, 2))
    s = cov_pos / pos.sum() + cov_neg / neg.sum()
    var = max(float(s[0, 0] + s[1, 1] - 2.0 * s[0, 1]), 0.0)
    return AUCComparison(auc_a, auc_b, float(np.sqrt(var)), int(y.size))
