"""The demo's users and interaction rows: histories, targets and the click model of each world,
and the writer of the train/valid/test tables."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from mmctr_assets.lib.data.demo.config import (
    _PARQUET_OPTS,
    _ROW_CHUNK,
    _STREAM_ROWS,
    _STREAM_USERS,
    HISTORY_INTEREST_SHARE,
    POSITIVE_RATE,
    RECENCY_DECAY,
    TARGET_INTEREST_SHARE,
    USER_BIAS_SD,
    V2_TARGET_INTEREST_SHARE,
    V2_TARGET_RECENT_SHARE,
    V2_TOPIC_STAY,
    V2_W_AFFINITY,
    V2_W_RECENT,
    V3_HEAVY_HISTORY_MEDIAN,
    V3_HEAVY_HISTORY_SIGMA,
    V3_HEAVY_USER_SHARE,
    W_AFFINITY,
    W_LIKES,
    W_POPULARITY,
    W_VIEWS,
    DemoSize,
    _list_array,
    _offsets,
    _positions,
    _rng,
    _sigmoid,
)
from mmctr_assets.lib.data.demo.items import _Items, _sample_items


@dataclasses.dataclass
class _Rows:
    user: np.ndarray        # (R,) int64 user index (user_id = index + 1)
    hist: np.ndarray        # flat history item ids, chronological within each row
    hist_len: np.ndarray    # (R,) int64
    hist_off: np.ndarray    # (R+1,) int64 offsets into hist
    target: np.ndarray      # (R,) item ids
    click_prob: np.ndarray  # (R,) float64
    label: np.ndarray       # (R,) float64
    target_interest: np.ndarray  # (R,) bool: target drawn from the user's interests
    logit_without_user: np.ndarray  # (R,) click logit without the per-user term (v1: the logit)
    user_bias: np.ndarray | None    # (U,) per-user click propensity (logit offset); None in v1
    logit_without_appeal: np.ndarray | None = None  # (R,) click logit without the item's appeal (v3)
    heavy_user: np.ndarray | None = None  # (U,) bool: a user with long histories (v3)


def _history_lengths(rng: np.random.Generator, n: int, max_len: int) -> np.ndarray:
    """3 + heavy-tailed extra: median ~6, mean ~8, max ``max_len`` (100 for the real data)."""
    extra = np.floor(rng.lognormal(mean=1.25, sigma=0.95, size=n)).astype(np.int64)
    return np.minimum(3 + extra, max_len)


def _long_history_lengths(rng: np.random.Generator, n: int, max_len: int) -> np.ndarray:
    """v3's heavy users: lognormal around V3_HEAVY_HISTORY_MEDIAN, at least 3, at most ``max_len``."""
    lengths = np.floor(rng.lognormal(np.log(V3_HEAVY_HISTORY_MEDIAN), V3_HEAVY_HISTORY_SIGMA, n))
    return np.clip(lengths.astype(np.int64), 3, max_len)


def _make_rows(size: DemoSize, items: _Items, seed: int, world: str = "v2") -> _Rows:
    rng_u = _rng(seed, _STREAM_USERS)
    n_users, k = size.n_users, size.n_topics
    n_rows = size.n_train + size.n_valid + size.n_test

    # Interests: 1-3 distinct topics (popular topics likelier) with Dirichlet weights.
    n_int = rng_u.choice([1, 2, 3], n_users, p=[0.4, 0.35, 0.25])
    topic_logw = np.log(np.bincount(items.topic[1:], minlength=k) + 1.0)
    keys = topic_logw - np.log(-np.log(rng_u.random((n_users, k))))
    interests = np.argpartition(-keys, 2, axis=1)[:, :3].astype(np.int64)
    weights = rng_u.gamma(1.5, size=(n_users, 3)) * (np.arange(3)[None, :] < n_int[:, None])
    weights /= weights.sum(axis=1, keepdims=True)
    cum_w = np.cumsum(weights, axis=1)

    def interest_topics(users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        slot = (rng.random(len(users))[:, None] > cum_w[users]).sum(axis=1)
        return interests[users, np.minimum(slot, n_int[users] - 1)]

    # Every user at least once, extra rows to active users (lognormal activity).
    rng = _rng(seed, _STREAM_ROWS)
    activity = rng.lognormal(0.0, 1.0, n_users)
    extra = rng.choice(n_users, n_rows - n_users, p=activity / activity.sum())
    user = rng.permutation(np.concatenate([np.arange(n_users), extra])).astype(np.int64)
    hist_len = _history_lengths(rng, n_rows, size.seq_len)
    heavy_user = None
    if world == "v3":  # the most active users have long histories (own stream: the rest is v2's)
        heavy_user = activity >= np.quantile(activity, 1 - V3_HEAVY_USER_SHARE)
        heavy = heavy_user[user]
        hist_len[heavy] = _long_history_lengths(_rng(seed, _STREAM_USERS, 2), int(heavy.sum()), size.seq_len)

    # One chronological sequence per user; each row's history is a prefix of it.
    seq_len_u = np.zeros(n_users, dtype=np.int64)
    np.maximum.at(seq_len_u, user, hist_len)
    seq_off = _offsets(seq_len_u)
    seq_user = np.repeat(np.arange(n_users), seq_len_u)
    if world == "v1":
        from_interest = rng.random(len(seq_user)) < HISTORY_INTEREST_SHARE
        seq = _sample_items(items, rng, None, len(seq_user))
        seq[from_interest] = _sample_items(
            items, rng, interest_topics(seq_user[from_interest], rng), int(from_interest.sum()))
    else:
        seq = _drifting_sequences(items, rng, seq_user, seq_off, interest_topics)
    hist_off = _offsets(hist_len)
    hist = seq[np.repeat(seq_off[:-1][user], hist_len) + _positions(hist_len)]
    del seq, seq_user

    if world == "v1":
        # Targets: half from the user's interests, half from everything (popularity-weighted).
        target_interest = rng.random(n_rows) < TARGET_INTEREST_SHARE
        target = _sample_items(items, rng, None, n_rows)
        target[target_interest] = _sample_items(
            items, rng, interest_topics(user[target_interest], rng), int(target_interest.sum()))
        t_topic = items.topic[target]
        affinity = (weights[user] * (interests[user] == t_topic[:, None])).sum(axis=1)
        user_term = np.zeros(n_rows)
        logit = W_AFFINITY * affinity
    else:
        # Targets: a quarter from the current session's topic (the last history item's), a
        # quarter from the user's long-term interests, half from everything.
        draw = rng.random(n_rows)
        last_topic = items.topic[hist[hist_off[1:] - 1]]
        topics = np.where(draw < V2_TARGET_RECENT_SHARE, last_topic, interest_topics(user, rng))
        target = _sample_items(items, rng, None, n_rows)
        pick = draw < V2_TARGET_RECENT_SHARE + V2_TARGET_INTEREST_SHARE
        target[pick] = _sample_items(items, rng, topics[pick], int(pick.sum()))
        target_interest = pick
        t_topic = items.topic[target]
        affinity = (weights[user] * (interests[user] == t_topic[:, None])).sum(axis=1)
        user_bias = USER_BIAS_SD * _rng(seed, _STREAM_USERS, 1).standard_normal(n_users)
        user_term = user_bias[user]
        logit = (V2_W_AFFINITY * affinity
                 + V2_W_RECENT * _recency_match(items.topic[hist], hist_len, hist_off, t_topic))
    logit = (logit
             + W_LIKES * (items.likes[target] - 5.5) / 2.87
             + W_VIEWS * (items.views[target] - 5.5) / 2.87
             + W_POPULARITY * items.z_pop[target]
             + items.topic_bias[t_topic])
    if world != "v1":
        logit += user_term
    appeal_term = items.appeal[target]
    if world == "v3":
        logit += appeal_term
    logit += _calibrate_bias(logit, POSITIVE_RATE)
    click_prob = _sigmoid(logit)
    label = (rng.random(n_rows) < click_prob).astype(np.float64)
    user_bias_out = None if world == "v1" else user_bias
    return _Rows(user=user, hist=hist, hist_len=hist_len, hist_off=hist_off, target=target,
                 click_prob=click_prob, label=label, target_interest=target_interest,
                 logit_without_user=logit - user_term, user_bias=user_bias_out,
                 logit_without_appeal=logit - appeal_term if world == "v3" else None, heavy_user=heavy_user)


def _drifting_sequences(items: _Items, rng: np.random.Generator, seq_user: np.ndarray, seq_off: np.ndarray,
                        interest_topics) -> np.ndarray:
    """World v2 histories: sessions. Each item continues the previous item's topic with probability
    V2_TOPIC_STAY, else starts a session on a fresh topic (one of the user's interests with
    probability HISTORY_INTEREST_SHARE, else a popularity-weighted one), so the last items tell
    the user's current interest. Vectorised: an item's topic is that of its session's first item."""
    m = len(seq_user)
    idx = np.arange(m)
    pos = idx - np.repeat(seq_off[:-1], np.diff(seq_off))
    from_interest = rng.random(m) < HISTORY_INTEREST_SHARE
    fresh = items.topic[_sample_items(items, rng, None, m)]
    fresh[from_interest] = interest_topics(seq_user[from_interest], rng)
    starts = (pos == 0) | (rng.random(m) >= V2_TOPIC_STAY)
    session_start = np.maximum.accumulate(np.where(starts, idx, 0))
    return _sample_items(items, rng, fresh[session_start], m)


def _recency_match(hist_topic: np.ndarray, hist_len: np.ndarray, hist_off: np.ndarray,
                   t_topic: np.ndarray) -> np.ndarray:
    """Per row: the share of the history in the target's topic, each item weighted by
    RECENCY_DECAY ** (its distance from the most recent item), so the last few items dominate."""
    row = np.repeat(np.arange(len(hist_len)), hist_len)
    distance = np.repeat(hist_len, hist_len) - 1 - _positions(hist_len)
    w = RECENCY_DECAY ** distance.astype(np.float64)
    match = np.bincount(row, weights=w * (hist_topic == t_topic[row]), minlength=len(hist_len))
    return match / np.bincount(row, weights=w, minlength=len(hist_len))


def _calibrate_bias(logit: np.ndarray, rate: float) -> float:
    """Bias b with mean(sigmoid(logit + b)) == rate, by bisection (the mean is monotone in b)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _sigmoid(logit + mid).mean() < rate else (lo, mid)
    return (lo + hi) / 2


def _rows_table(rows: _Rows, items: _Items, lo: int, hi: int, seq_len: int, schema: pa.Schema,
                ids: np.ndarray | None = None) -> pa.Table:
    """Rows lo..hi with histories left-padded to ``seq_len`` (real items at the end)."""
    n = hi - lo
    lengths = rows.hist_len[lo:hi]
    padded = np.zeros((n, seq_len), dtype=np.int64)
    padded[np.arange(seq_len)[None, :] >= seq_len - lengths[:, None]] = \
        rows.hist[rows.hist_off[lo]:rows.hist_off[hi]]
    seq = _list_array(padded.ravel(), np.full(n, seq_len))
    target = rows.target[lo:hi]
    cols = {
        "ID": ids, "user_id": rows.user[lo:hi] + 1, "item_seq": seq, "item_id": target,
        "likes_level": items.likes[target], "views_level": items.views[target],
        "label": rows.label[lo:hi],
    }
    return pa.table({f.name: cols[f.name] for f in schema}, schema=schema)


def _write_rows(path: Path, rows: _Rows, items: _Items, lo: int, hi: int, seq_len: int,
                schema: pa.Schema, progress: bool, ids: np.ndarray | None = None) -> None:
    with pq.ParquetWriter(path, schema, **_PARQUET_OPTS) as writer:
        starts = range(lo, hi, _ROW_CHUNK)
        for a in tqdm(starts, desc=path.name, unit="chunk", disable=not progress or len(starts) < 2):
            b = min(a + _ROW_CHUNK, hi)
            chunk_ids = None if ids is None else ids[a - lo:b - lo]
            writer.write_table(_rows_table(rows, items, a, b, seq_len, schema, chunk_ids))
