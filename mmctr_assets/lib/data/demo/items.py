"""The demo's items: topics, exposure (popularity), levels, latent appeal (v3), and the content
that shows their topic: tags, titles, the organisers' embeddings and precomputed vectors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmctr_assets.lib.data.demo.config import (
    _STREAM_ITEMS,
    EMB_DIM,
    FILLER_WORDS,
    GENERIC_HASHTAGS,
    ITEM_EMB_VERSIONS,
    MAX_ITEM_TAGS,
    N_NOISE_TAGS,
    POPULARITY_EXPONENT,
    PRECOMPUTED_DIMS,
    TAGS_PER_TOPIC,
    THEMES,
    TOPIC_BIAS_SD,
    V3_ITEM_APPEAL_SD,
    V3_POPULARITY_EXPONENT,
    DemoSize,
    _levels,
    _list_array,
    _positions,
    _rng,
    _zscore,
)


@dataclasses.dataclass
class _Items:
    topic: np.ndarray        # (N+1,) int64, index = item_id, [0] = -1 for padding
    likes: np.ndarray        # (N+1,) int64 levels 1..10, [0] = 0
    views: np.ndarray        # (N+1,) int64 levels 1..10, [0] = 0
    z_pop: np.ndarray        # (N+1,) standardised log popularity
    cum_pop: np.ndarray      # (N,) cumulative popularity with items ordered by topic
    order: np.ndarray        # (N,) item ids ordered by topic
    topic_lo: np.ndarray     # (K,) cum_pop value where each topic starts
    topic_hi: np.ndarray     # (K,) cum_pop value where each topic ends
    topic_bias: np.ndarray   # (K,) click logit offset per topic
    appeal: np.ndarray       # (N+1,) click logit offset per item, no content shows it (v3; else zeros)


def _make_items(size: DemoSize, seed: int, world: str = "v2") -> _Items:
    rng = _rng(seed, _STREAM_ITEMS)
    n, k = size.n_items, size.n_topics
    topic_share = rng.dirichlet(np.full(k, 4.0))
    topic = np.concatenate([np.arange(k), rng.choice(k, n - k, p=topic_share)])  # every topic non-empty
    topic = rng.permutation(topic)  # item ids carry no topic information

    # Zipf-like popularity: v1/v2 rank within topic in a random order; v3 one global random rank
    # (own stream, so v1/v2 draw exactly what they always drew), a longer tail.
    order = np.lexsort((rng.random(n), topic))
    sorted_topic = topic[order]
    starts = np.searchsorted(sorted_topic, np.arange(k))
    if world == "v3":
        global_rank = _rng(seed, _STREAM_ITEMS, 4).permutation(n)
        popularity = (global_rank + 1.0) ** -V3_POPULARITY_EXPONENT
        pop_sorted = popularity[order]
    else:
        rank = np.arange(n) - starts[sorted_topic]
        pop_sorted = (rank + 1.0) ** -POPULARITY_EXPONENT
        popularity = np.empty(n)
        popularity[order] = pop_sorted
    cum_pop = np.cumsum(pop_sorted)
    ends = np.searchsorted(sorted_topic, np.arange(k), side="right")
    topic_lo = np.where(starts > 0, cum_pop[np.maximum(starts - 1, 0)], 0.0)
    topic_hi = cum_pop[ends - 1]

    z_pop = _zscore(np.log(popularity))
    quality = rng.standard_normal(n)
    views = _levels(z_pop + 0.5 * rng.standard_normal(n))
    likes = _levels(0.5 * z_pop + 0.87 * quality)

    # v3's appeal: its own stream, independent of everything above and of all content.
    appeal = (V3_ITEM_APPEAL_SD * _rng(seed, _STREAM_ITEMS, 5).standard_normal(n) if world == "v3"
              else np.zeros(n))
    pad = lambda a, v: np.concatenate([[v], a])  # noqa: E731
    return _Items(
        topic=pad(topic, -1).astype(np.int64), likes=pad(likes, 0), views=pad(views, 0), z_pop=pad(z_pop, 0.0),
        cum_pop=cum_pop, order=order.astype(np.int64) + 1, topic_lo=topic_lo, topic_hi=topic_hi,
        topic_bias=TOPIC_BIAS_SD * rng.standard_normal(k), appeal=pad(appeal, 0.0),
    )


def _sample_items(items: _Items, rng: np.random.Generator, topics: np.ndarray | None, n: int) -> np.ndarray:
    """Popularity-weighted item ids, within ``topics`` (one per draw) or over all items (None)."""
    if topics is None:
        u = rng.random(n) * items.cum_pop[-1]
    else:
        lo, hi = items.topic_lo[topics], items.topic_hi[topics]
        u = lo + rng.random(n) * (hi - lo)
    idx = np.searchsorted(items.cum_pop, u, side="right")
    return items.order[np.minimum(idx, len(items.order) - 1)]


def _item_tags(size: DemoSize, items: _Items, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length (1..8) distinct tags per item, mostly from its topic's vocabulary."""
    rng = _rng(seed, _STREAM_ITEMS, 1)
    n = size.n_items
    topic = items.topic[1:]
    n_tags = 1 + rng.binomial(MAX_ITEM_TAGS - 1, 0.4, n)
    # Gumbel top-k over [topic tags | noise tags]: distinct tags, topic tags ~8x likelier each.
    weight = np.concatenate([np.full(TAGS_PER_TOPIC, 8.0), np.ones(N_NOISE_TAGS)])
    keys = np.log(weight) - np.log(-np.log(rng.random((n, len(weight)))))
    pick = np.argsort(-keys, axis=1)[:, :MAX_ITEM_TAGS]
    tag_id = np.where(pick < TAGS_PER_TOPIC,
                      1 + topic[:, None] * TAGS_PER_TOPIC + pick,
                      1 + size.n_topics * TAGS_PER_TOPIC + (pick - TAGS_PER_TOPIC))
    keep = np.arange(MAX_ITEM_TAGS)[None, :] < n_tags[:, None]
    return tag_id[keep].astype(np.int64), n_tags


def _titles(size: DemoSize, items: _Items, seed: int) -> pa.Array:
    """'filler topic-words #hashtags' titles, assembled column-wise from vocabulary indices."""
    rng = _rng(seed, _STREAM_ITEMS, 2)
    n, k = size.n_items, size.n_topics
    n_words = len(THEMES[0][0])
    n_hash = len(THEMES[0][1])
    words = [w for theme in THEMES[:k] for w in theme[0]]
    hashtags = [h for theme in THEMES[:k] for h in theme[1]]
    vocab = pa.array(words + list(FILLER_WORDS) + hashtags + list(GENERIC_HASHTAGS))
    filler0 = len(words)
    hash0 = filler0 + len(FILLER_WORDS)
    generic0 = hash0 + len(hashtags)

    topic = items.topic[1:]
    n_fill, n_topic_words, n_tags = rng.integers(0, 3, n), rng.integers(1, 4, n), rng.integers(1, 3, n)
    lengths = n_fill + n_topic_words + n_tags
    owner = np.repeat(np.arange(n), lengths)
    pos = _positions(lengths)
    m = len(owner)
    # A tenth of topic words come from a random other topic: titles are informative, not perfect.
    word_topic = np.where(rng.random(m) < 0.9, topic[owner], rng.integers(0, k, m))
    token = np.where(
        pos < n_fill[owner], filler0 + rng.integers(0, len(FILLER_WORDS), m),
        np.where(pos < (n_fill + n_topic_words)[owner],
                 word_topic * n_words + rng.integers(0, n_words, m),
                 np.where(rng.random(m) < 0.85, hash0 + topic[owner] * n_hash + rng.integers(0, n_hash, m),
                          generic0 + rng.integers(0, len(GENERIC_HASHTAGS), m))))
    return pc.binary_join(_list_array(vocab.take(pa.array(token)), lengths), " ")


def _organiser_embedding(size: DemoSize, items: _Items, seed: int) -> np.ndarray:
    """Noisy topic centroid + popularity direction: a weak but meaningful baseline embedding."""
    rng = _rng(seed, _STREAM_ITEMS, 3)
    centroids = rng.standard_normal((size.n_topics, EMB_DIM))
    pop_dir = rng.standard_normal(EMB_DIM)
    topic = items.topic[1:]
    emb = (0.15 * centroids[topic] + 0.1 * items.z_pop[1:, None] * pop_dir
           + rng.standard_normal((size.n_items, EMB_DIM)))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return np.vstack([np.zeros((1, EMB_DIM)), emb]).astype(np.float32)


def _topic_vectors(size: DemoSize, items: _Items, rng: np.random.Generator, dim: int, weight: float) -> np.ndarray:
    """[N, dim] float32 vectors: ``weight`` times a random topic centroid plus unit noise per
    dimension: well-formed stand-ins for the real download's vectors, weakly showing the topic."""
    centroids = rng.standard_normal((size.n_topics, dim), dtype=np.float32)
    noise = rng.standard_normal((size.n_items, dim), dtype=np.float32)
    return (np.float32(weight) * centroids[items.topic[1:]] + noise).astype(np.float32)


def _precomputed_vectors(size: DemoSize, items: _Items, seed: int) -> dict[str, np.ndarray]:
    """item_feature's txt_emb_BERT / img_emb_CLIPRN50 stand-ins (own streams: nothing else moves).
    Over their 1,792 dims they show the topic about as much as item_info's 128-d embedding does."""
    return {col: _topic_vectors(size, items, _rng(seed, _STREAM_ITEMS, 6, i), dim, 0.05)
            for i, (col, dim) in enumerate(PRECOMPUTED_DIMS.items())}


def _item_emb_versions(size: DemoSize, items: _Items, seed: int) -> dict[str, np.ndarray]:
    """item_emb.parquet's four 128-d stand-ins; v3 shows the topic most (QIN chose v3 on the real data)."""
    weights = {"item_emb_d128_v1": 0.1, "item_emb_d128_v2": 0.1, "item_emb_d128_v3": 0.2, "item_emb_d128_e4": 0.1}
    return {col: _topic_vectors(size, items, _rng(seed, _STREAM_ITEMS, 7, i), EMB_DIM, weights[col])
            for i, col in enumerate(ITEM_EMB_VERSIONS)}
