"""metrics.py and plots.py (the plots are thin views of the metrics)."""

import math

import numpy as np
import pytest

from mmctr_assets.lib.metrics import auc, delong_test, logloss, roc_points
from mmctr_assets.lib.plots import plot_roc, plot_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_auc_known_values():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.2, 0.9]) == 1.0
    assert auc([0, 1], [0.9, 0.2]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # ties count half


def test_logloss_known_values_and_clipping():
    assert logloss([1, 0], [0.8, 0.3]) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert logloss([1, 1], [1.0, 1.0]) == pytest.approx(-math.log(1 - 1e-7))
    assert math.isfinite(logloss([1], [0.0]))
    assert logloss([1, 1], [0.5, 0.5]) == pytest.approx(math.log(2))  # one class is fine here


def test_roc_points_span_the_unit_square():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = y + rng.normal(size=500)
    fpr, tpr, thresholds = roc_points(y, s)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert len(thresholds) == len(fpr) < 500  # collinear points dropped
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc(y, s))


@pytest.mark.parametrize("labels, scores, message", [
    ([1, 1, 1], [0.1, 0.2, 0.3], "AUC is undefined: all 3 labels are 1"),
    ([0, 1, 0.5], [0.1, 0.2, 0.3], r"labels must be 0 or 1; 1 are not \(e.g. 0.5 at index 2\)"),
    ([0, 1], [0.1, np.nan], "scores has 1 NaN/inf values"),
    ([0, 1], [0.1], "same length, got 2 and 1"),
    ([], [], "empty"),
])
def test_auc_rejects_bad_input_clearly(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        auc(labels, scores)


def test_logloss_rejects_logits():
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\].*not logits"):
        logloss([0, 1], [-2.0, 3.0])


def _history():
    return [{"epoch": e, "train_loss": 0.6 - 0.05 * e, "valid_auc": 0.7 + 0.02 * e,
             "valid_logloss": 0.55 - 0.01 * e, "lr": 1e-3 if e < 3 else 1e-4} for e in range(1, 5)]


def test_plot_training_curves_returns_png():
    png = plot_training_curves(_history())
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_plot_training_curves_accepts_epoch_logs():
    from mmctr_assets.lib.ctr.trainer import EpochLog

    logs = [EpochLog(**h, seconds=1.0, samples_per_s=1e4, improved=True) for h in _history()]
    assert plot_training_curves(logs).startswith(PNG_MAGIC)


def test_plot_training_curves_rejects_bad_history():
    with pytest.raises(ValueError, match="history is empty"):
        plot_training_curves([])
    with pytest.raises(ValueError, match=r"lack \['valid_logloss', 'lr'\]"):
        plot_training_curves([{"epoch": 1, "train_loss": 0.5, "valid_auc": 0.7}])


def test_plot_roc_returns_png_and_validates():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    assert plot_roc(y, y + rng.normal(size=300)).startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="AUC is undefined"):
        plot_roc([0, 0], [0.3, 0.4])


def _delong_by_definition(y, a, b):
    """DeLong's variance straight from its definition, O(m*n): the kernel psi(x, y) = 1, 1/2, 0."""
    comps = []
    for s in (a, b):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        comps.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    cov = np.cov([comps[0][1], comps[1][1]]) / (y == 1).sum() + np.cov([comps[0][2], comps[1][2]]) / (y == 0).sum()
    return comps[0][0] - comps[1][0], math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])


def test_delong_matches_its_definition_and_sklearn_ties_included():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    a = np.round(y + rng.normal(size=300), 1)  # rounded: ties within and across classes
    b = np.round(0.5 * y + rng.normal(size=300), 1)
    got = delong_test(y, a, b)
    diff, se = _delong_by_definition(y, a, b)
    assert got.auc_a == pytest.approx(auc(y, a), abs=1e-12) and got.auc_b == pytest.approx(auc(y, b), abs=1e-12)
    assert got.diff == pytest.approx(diff, abs=1e-12) and got.se == pytest.approx(se, rel=1e-9)


def test_delong_standard_error_agrees_with_a_paired_bootstrap():
    """The paired bootstrap resamples rows and scores both models on each resample; DeLong's se is
    its asymptotic value. 2000 resamples estimate an se to about 1.6%: 10% leaves room for that and
    for the finite-sample gap at 2000 rows."""
    rng = np.random.default_rng(2)
    n = 2000
    y = (rng.random(n) < 0.25).astype(float)
    shared = rng.normal(size=n)  # the models share most of their errors, as retrains do
    a = 1.2 * y + shared + 0.4 * rng.normal(size=n)
    b = 1.1 * y + shared + 0.4 * rng.normal(size=n)
    got = delong_test(y, a, b)
    diffs, singles = [], []
    for _ in range(2000):
        i = rng.integers(0, n, n)
        singles.append(auc(y[i], a[i]))
        diffs.append(singles[-1] - auc(y[i], b[i]))
    assert got.se == pytest.approx(float(np.std(diffs, ddof=1)), rel=0.10)
    # paired: the difference is known better than either AUC alone (what a gate on AUCs ignores)
    assert got.se < 0.7 * float(np.std(singles, ddof=1))


def test_delong_p_value_and_interval_agree_and_say_which_way():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 1000).astype(float)
    good = 2.0 * y + rng.normal(size=1000)
    worse = 0.5 * y + rng.normal(size=1000)
    cmp = delong_test(y, worse, good)
    assert cmp.diff < 0 and cmp.p_worse() < 1e-6  # clearly worse: tiny p
    assert delong_test(y, good, worse).p_worse() > 1 - 1e-6  # clearly better: p near 1
    for alpha in (0.05, 0.2):
        lo, hi = cmp.interval(alpha)
        assert lo < cmp.diff < hi
        margin = -hi  # the margin at which the upper end sits exactly on -margin: p == alpha
        assert cmp.p_worse(margin) == pytest.approx(alpha, rel=1e-9)
    same = delong_test(y, good, good)  # identical scorers: no difference and no noise
    assert same.diff == 0 and same.se == 0 and same.p_worse() == 1.0
    with pytest.raises(ValueError, match="same length"):
        delong_test(y, good, good[:-1])
