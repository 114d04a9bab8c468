"""Leak-free click statistics of the target item and of the user: the features a logistic regression
on counts is built from, and an option of every model family (``use_statistics_features``).

Per row, four numbers (:data:`FEATURES`): the logit of the target item's smoothed click rate, the
log1p of its count (training rows with that target), and the same two for the user. A rate is
smoothed towards the global training click rate ``p`` with ``strength`` pseudo-rows,
``(clicks + strength * p) / (count + strength)``, so an id seen a handful of times is not read as
certain; an unseen id gets ``p`` and count 0. Rates enter as logits (a click rate acts additively on
the log-odds the model outputs, and the smoothing keeps them finite) and counts as log1p (evidence
grows with the order of magnitude, not the row count); :class:`TrainingStatistics` standardises all
four over the training rows so they sit on the scale of the other inputs.

No row's label enters its own features:

- training rows get out-of-fold values: rows are split into ``folds`` folds by a seeded permutation,
  and a row's statistics (the prior rate included) come from the other folds only. Counts from
  ``folds - 1`` of ``folds`` parts are scaled by ``folds / (folds - 1)`` so a training row's count
  means what a valid row's does (both then estimate the count over all training rows);
- valid, test and served rows get values from all training rows, which :class:`TrainingStatistics`
  keeps (as buffers: the model file carries them, so every later prediction computes them exactly
  as the training run did).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch import nn

FEATURES = ("item_rate_logit", "item_log_count", "user_rate_logit", "user_log_count")
# Pseudo-rows at the global click rate in each smoothed rate. An id's own rate outweighs the global
# one once it has more rows than this; a rate from fewer rows at a ~25% click rate has a standard
# error above ~0.13, about the spread between ids, so it is mostly noise. The count feature beside
# the rate lets the model learn how far to trust it beyond that.
DEFAULT_PRIOR_STRENGTH = 10.0
DEFAULT_FOLDS = 5


def encode(clicks: torch.Tensor, counts: torch.Tensor, prior: torch.Tensor | float,
           strength: float) -> torch.Tensor:
    """``[..., 2]``: (logit of the smoothed rate, log1p count) from clicks and counts ``[...]``."""
    rate = (clicks + strength * prior) / (counts + strength)
    return torch.stack([torch.logit(rate), torch.log1p(counts)], dim=-1)


def fold_of_rows(n: int, folds: int, seed: int) -> np.ndarray:
    """Fold ``0..folds-1`` of each of ``n`` rows: balanced, from a seeded permutation."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2 (out-of-fold statistics need another fold), got {folds}")
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return fold


def _frame(item_id, user_id, label) -> pl.DataFrame:
    label = np.asarray(label, dtype=np.float64)
    if label.size and not np.isin(label, (0.0, 1.0)).all():
        raise ValueError("statistics need labels 0/1")
    return pl.DataFrame({"item_id": np.asarray(item_id, dtype=np.int64),
                         "user_id": np.asarray(user_id, dtype=np.int64), "label": label})


def _totals(rows: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    return rows.group_by(keys).agg(pl.col("label").sum().alias("clicks"), pl.len().cast(pl.Float64).alias("n"))


def out_of_fold(item_id, user_id, label, *, folds: int = DEFAULT_FOLDS, seed: int = 0,
                strength: float = DEFAULT_PRIOR_STRENGTH) -> torch.Tensor:
    """Raw :data:`FEATURES` ``float32 [N, 4]`` of training rows, each from the other folds only."""
    rows = _frame(item_id, user_id, label).with_columns(fold=pl.Series(fold_of_rows(len(item_id), folds, seed)))
    fold_totals = _totals(rows, ["fold"])
    scale = folds / (folds - 1)
    all_clicks, all_n = float(rows["label"].sum()), float(len(rows))
    fold_prior = fold_totals.select("fold", ((all_clicks - pl.col("clicks")) / (all_n - pl.col("n"))).alias("p"))
    p = rows.select("fold").join(fold_prior, on="fold", how="left", maintain_order="left")["p"].to_numpy()
    parts = []
    for key in ("item_id", "user_id"):
        other = (rows.select(key, "fold")
                 .join(_totals(rows, [key]), on=key, how="left", maintain_order="left")
                 .join(_totals(rows, [key, "fold"]), on=[key, "fold"], how="left", maintain_order="left",
                       suffix="_fold")
                 .select(((pl.col("clicks") - pl.col("clicks_fold")) * scale).alias("clicks"),
                         ((pl.col("n") - pl.col("n_fold")) * scale).alias("n")))
        parts.append(encode(torch.tensor(other["clicks"].to_numpy()), torch.tensor(other["n"].to_numpy()),
                            torch.tensor(p), strength))
    return torch.cat(parts, dim=-1).float()


class TrainingStatistics(nn.Module):
    """Per-item and per-user clicks and counts over all training rows, the global click rate, and
    the training rows' feature means and deviations: what valid/test/served rows' features are
    computed from. Buffers, so they travel in the model's state dict.

    ``forward(item_id, user_id)`` -> raw :data:`FEATURES` ``[B, 4]``; :meth:`standardise` scales raw
    features (these or a training row's out-of-fold ones) for the model.
    """

    def __init__(self, n_items: int, n_users: int, strength: float = DEFAULT_PRIOR_STRENGTH):
        super().__init__()
        if not strength > 0:
            raise ValueError(f"the prior strength must be > 0 (pseudo-rows at the mean rate), got {strength}")
        self.strength = float(strength)
        self.register_buffer("item_clicks", torch.zeros(n_items + 1))
        self.register_buffer("item_counts", torch.zeros(n_items + 1))
        self.register_buffer("user_ids", torch.zeros(n_users, dtype=torch.int64))  # sorted
        self.register_buffer("user_clicks", torch.zeros(n_users))
        self.register_buffer("user_counts", torch.zeros(n_users))
        self.register_buffer("prior", torch.full((), 0.5))
        self.register_buffer("mean", torch.zeros(len(FEATURES)))
        self.register_buffer("std", torch.ones(len(FEATURES)))

    @classmethod
    def fit(cls, item_id, user_id, label, n_items: int, *, folds: int = DEFAULT_FOLDS, seed: int = 0,
            strength: float = DEFAULT_PRIOR_STRENGTH) -> tuple[TrainingStatistics, torch.Tensor]:
        """(statistics of all training rows, the training rows' out-of-fold raw features ``[N, 4]``).

        ``item_id`` must lie in ``0..n_items``; ``user_id`` is any int64 (unseen users map to the prior).
        """
        rows = _frame(item_id, user_id, label)
        if len(rows) == 0:
            raise ValueError("statistics need at least one training row")
        if rows["item_id"].min() < 0 or rows["item_id"].max() > n_items:
            raise ValueError(f"item_id outside 0..{n_items}")
        users = _totals(rows, ["user_id"]).sort("user_id")
        stats = cls(n_items, len(users), strength)
        items = _totals(rows, ["item_id"])
        index = torch.tensor(items["item_id"].to_numpy())
        stats.item_clicks[index] = torch.tensor(items["clicks"].to_numpy()).float()
        stats.item_counts[index] = torch.tensor(items["n"].to_numpy()).float()
        stats.user_ids.copy_(torch.tensor(users["user_id"].to_numpy()))
        stats.user_clicks.copy_(torch.tensor(users["clicks"].to_numpy()))
        stats.user_counts.copy_(torch.tensor(users["n"].to_numpy()))
        stats.prior.fill_(float(rows["label"].mean()))
        oof = out_of_fold(item_id, user_id, label, folds=folds, seed=seed, strength=strength)
        std = oof.std(dim=0) if len(oof) > 1 else torch.ones(len(FEATURES))
        stats.mean.copy_(oof.mean(dim=0))
        stats.std.copy_(torch.where(std > 0, std, torch.ones_like(std)))
        return stats, oof

    @property
    def n_users(self) -> int:
        return self.user_ids.shape[0]

    def forward(self, item_id: torch.Tensor, user_id: torch.Tensor) -> torch.Tensor:
        """Raw features ``float32 [B, 4]`` of rows from all training rows (unseen ids: prior, count 0)."""
        item_id = item_id.long()
        item = encode(self.item_clicks[item_id], self.item_counts[item_id], self.prior, self.strength)
        if self.n_users:
            pos = torch.searchsorted(self.user_ids, user_id).clamp(max=self.n_users - 1)
            seen = self.user_ids[pos] == user_id
            clicks = torch.where(seen, self.user_clicks[pos], 0.0)
            counts = torch.where(seen, self.user_counts[pos], 0.0)
        else:
            clicks = counts = torch.zeros(user_id.shape, device=item.device)
        return torch.cat([item, encode(clicks, counts, self.prior, self.strength)], dim=-1)

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw features scaled by the training rows' out-of-fold means and deviations."""
        return (raw - self.mean) / self.std

    def features(self, item_id, user_id) -> np.ndarray:
        """:meth:`forward` for numpy/polars callers (a benchmark's logistic regression)."""
        with torch.no_grad():
            return self(torch.tensor(np.asarray(item_id, dtype=np.int64)),
                        torch.tensor(np.asarray(user_id, dtype=np.int64))).numpy()
