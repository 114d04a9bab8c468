"""Synthetic MicroLens-format dataset with planted, learnable structure.

The real MicroLens_1M_x1 data cannot be downloaded here, so this writes a stand-in in the exact
challenge format (DESIGN.md section 1) whose labels come from a known click model. The true click
probabilities go to ``ground_truth/`` so tests and demos can compare a model with the best
achievable AUC.

The planted story: items belong to topics that show in their tags, titles and cover images; each
user likes 1-3 topics and their history is drawn mostly from those topics; a click is likely when
the target's topic is one the user likes, and somewhat likelier for well-liked, much-viewed and
popular items. That is world v1 (``world="v1"``). World v2, the default, adds what real logs
carry: histories in sessions of one topic, a click that depends most on the last few history
items (a recency-weighted topic match), and a per-user click propensity (a logit offset per
user). Everything is built column-wise from flat numpy arrays (lists via offsets), so the
full size (4M rows) fits in a few GiB.
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import io
import json
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from mmctr_assets.lib.data.microlens import DATASET_DIR, GROUND_TRUTH_DIR, IMAGES_DIR, TABLES
from mmctr_assets.lib.io import atomic_path

log = logging.getLogger(__name__)

EMB_DIM = 128
N_INFO_TAGS = 5
MAX_ITEM_TAGS = 8
POSITIVE_RATE = 0.25

# Topic themes: (title words, hashtags). Topic t uses theme t, so n_topics <= len(THEMES).
THEMES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("baking", "recipe", "homemade", "bread", "cake", "cozy", "kitchen", "dinner", "pasta", "dessert"), ("#food", "#recipe")),
    (("beach", "sunset", "journey", "island", "mountains", "roadtrip", "hotel", "city", "explore", "backpack"), ("#travel", "#wanderlust")),
    (("workout", "gym", "squat", "cardio", "abs", "training", "muscle", "stretch", "running", "sweat"), ("#fitness", "#gym")),
    (("gameplay", "boss", "level", "speedrun", "console", "controller", "quest", "multiplayer", "loot", "pixel"), ("#gaming", "#gamer")),
    (("puppy", "kitten", "dog", "cat", "paws", "fluffy", "adorable", "bark", "leash", "treats"), ("#pets", "#cute")),
    (("guitar", "piano", "cover", "song", "melody", "concert", "beat", "vocals", "drums", "chorus"), ("#music", "#cover")),
    (("outfit", "dress", "sneakers", "style", "jacket", "lookbook", "denim", "vintage", "accessories", "runway"), ("#fashion", "#ootd")),
    (("makeup", "lipstick", "skincare", "eyeliner", "foundation", "glow", "tutorial", "serum", "blush", "nails"), ("#beauty", "#makeup")),
    (("smartphone", "unboxing", "laptop", "gadget", "review", "camera", "battery", "charger", "specs", "headphones"), ("#tech", "#unboxing")),
    (("engine", "drift", "supercar", "garage", "turbo", "racing", "wheels", "exhaust", "sedan", "horsepower"), ("#cars", "#automotive")),
    (("prank", "funny", "sketch", "joke", "laugh", "parody", "blooper", "roast", "skit", "meme"), ("#comedy", "#funny")),
    (("choreography", "moves", "dancer", "hiphop", "ballet", "routine", "groove", "spin", "shuffle", "tango"), ("#dance", "#dancechallenge")),
    (("plants", "garden", "flowers", "seeds", "soil", "harvest", "tomatoes", "succulent", "greenhouse", "compost"), ("#gardening", "#plants")),
    (("crafts", "handmade", "woodwork", "paint", "glue", "project", "upcycle", "sewing", "knitting", "decor"), ("#diy", "#crafts")),
    (("experiment", "chemistry", "physics", "rocket", "microscope", "reaction", "lab", "atoms", "magnet", "planet"), ("#science", "#stem")),
    (("football", "goal", "basketball", "dunk", "match", "stadium", "highlights", "tennis", "soccer", "champion"), ("#sports", "#highlights")),
    (("notes", "exam", "lecture", "homework", "library", "studying", "productivity", "planner", "college", "focus"), ("#study", "#studygram")),
    (("baby", "toddler", "family", "mom", "dad", "bedtime", "playtime", "kids", "nursery", "stroller"), ("#parenting", "#family")),
    (("anime", "manga", "cosplay", "character", "episode", "otaku", "sketchbook", "chibi", "fanart", "opening"), ("#anime", "#manga")),
    (("forest", "river", "waterfall", "wildlife", "birds", "hiking", "camping", "lake", "meadow", "trail"), ("#nature", "#outdoors")),
    (("money", "investing", "stocks", "budget", "savings", "crypto", "trading", "income", "wealth", "taxes"), ("#finance", "#money")),
    (("espresso", "latte", "barista", "beans", "brew", "cappuccino", "cafe", "roasting", "mug", "pourover"), ("#coffee", "#cafe")),
    (("painting", "canvas", "watercolor", "portrait", "brush", "gallery", "acrylic", "drawing", "mural", "easel"), ("#art", "#artist")),
    (("lens", "shutter", "lighting", "editing", "tripod", "goldenhour", "film", "aperture", "drone", "photoshoot"), ("#photography", "#photo")),
    (("cleaning", "organizing", "apartment", "interior", "bedroom", "makeover", "minimalist", "furniture", "laundry", "tidy"), ("#home", "#cleantok")),
    (("fishing", "bait", "catch", "boat", "rod", "trout", "ocean", "pier", "reel", "lure"), ("#fishing", "#angler")),
    (("ancient", "castle", "museum", "empire", "medieval", "ruins", "war", "documentary", "legend", "archive"), ("#history", "#documentary")),
    (("streetfood", "noodles", "dumplings", "spicy", "grill", "market", "skewers", "ramen", "tacos", "snack"), ("#streetfood", "#foodie")),
    (("galaxy", "stars", "telescope", "moon", "nebula", "astronaut", "orbit", "eclipse", "comet", "cosmos"), ("#space", "#astronomy")),
    (("bicycle", "cycling", "helmet", "pedal", "downhill", "bmx", "tour", "spokes", "saddle", "sprint"), ("#cycling", "#bike")),
    (("wedding", "bride", "groom", "vows", "bouquet", "ceremony", "rings", "reception", "veil", "honeymoon"), ("#wedding", "#love")),
    (("magic", "trick", "illusion", "cards", "magician", "reveal", "sleight", "vanish", "mystery", "wand"), ("#magic", "#illusion")),
)
FILLER_WORDS = ("my", "the", "best", "new", "daily", "easy", "quick", "ultimate", "first", "amazing",
                "simple", "today", "weekend", "vlog", "guide", "tips", "challenge", "epic", "little", "big")
GENERIC_HASHTAGS = ("#fyp", "#viral", "#trending", "#foryou")

# Click model weights (logit scale); the bias is calibrated so about 25% of labels are positive.
W_AFFINITY = 3.5  # times the user's interest weight in the target's topic (0 outside their interests)
W_LIKES = 0.35    # per standard deviation of likes_level
W_VIEWS = 0.25    # per standard deviation of views_level
W_POPULARITY = 0.3  # per standard deviation of log item popularity
TOPIC_BIAS_SD = 0.3
HISTORY_INTEREST_SHARE = 0.85  # share of history items drawn from the user's interests
TARGET_INTEREST_SHARE = 0.5    # share of targets drawn from the user's interests

# World v2 (the default; `world="v1"` is the world above, byte for byte): real logs' recency and
# per-user propensity. Histories come in sessions of one topic, the click depends on the
# recency-weighted topic match of the history (the last items dominate), and each user has a
# click bias, learnable from user_id because users repeat across train, valid and test.
WORLDS = ("v1", "v2")
V2_W_AFFINITY = 1.5       # long-term interest weight in the target's topic (as W_AFFINITY in v1)
V2_W_RECENT = 2.5         # times the recency-weighted share of history items in the target's topic
RECENCY_DECAY = 0.6       # weight of a history item at distance d from the most recent: 0.6 ** d
V2_TOPIC_STAY = 0.7       # chance the next history item continues the current session's topic
V2_TARGET_RECENT_SHARE = 0.25    # targets from the current session's topic (the last history item's)
V2_TARGET_INTEREST_SHARE = 0.25  # targets from the user's long-term interests
USER_BIAS_SD = 0.6        # per-user click propensity: logit offset ~ N(0, USER_BIAS_SD)
TAGS_PER_TOPIC = 12
N_NOISE_TAGS = 40


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """Dataset dimensions; override one field with ``dataclasses.replace(SIZES["tiny"], ...)``."""

    name: str
    n_items: int
    n_train: int
    n_valid: int
    n_test: int
    n_users: int
    n_topics: int
    seq_len: int = 100
    image_size: int = 64
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        n_rows = self.n_train + self.n_valid + self.n_test
        checks = [
            (20 <= self.n_items <= 10_000_000, f"n_items={self.n_items} must be in 20..10,000,000"),
            (min(self.n_train, self.n_valid, self.n_test) >= 1, "n_train, n_valid and n_test must be >= 1"),
            (1 <= self.n_users <= n_rows, f"n_users={self.n_users} must be in 1..n_train+n_valid+n_test={n_rows}"),
            (2 <= self.n_topics <= len(THEMES), f"n_topics={self.n_topics} must be in 2..{len(THEMES)}"),
            (self.n_items >= 2 * self.n_topics, f"n_items={self.n_items} must be >= 2 * n_topics={2 * self.n_topics}"),
            (3 <= self.seq_len <= 4096,
             f"seq_len={self.seq_len} must be in 3..4096 (the shortest history has 3 items)"),
            (self.image_size >= 8, f"image_size={self.image_size} must be >= 8 pixels"),
            (1 <= self.jpeg_quality <= 95, f"jpeg_quality={self.jpeg_quality} must be in 1..95"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError(f"invalid DemoSize {self.name!r}: " + "; ".join(bad))


SIZES: dict[str, DemoSize] = {
    "tiny": DemoSize("tiny", n_items=300, n_train=2_000, n_valid=500, n_test=500, n_users=830,
                     n_topics=8, seq_len=20, image_size=32),
    "small": DemoSize("small", n_items=2_000, n_train=20_000, n_valid=2_000, n_test=2_000, n_users=6_700,
                      n_topics=16),
    "medium": DemoSize("medium", n_items=10_000, n_train=200_000, n_valid=10_000, n_test=20_000,
                       n_users=64_000, n_topics=24),
    "full": DemoSize("full", n_items=91_717, n_train=3_600_000, n_valid=10_000, n_test=379_142,
                     n_users=1_000_000, n_topics=32),
}

ROWS_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("item_seq", pa.list_(pa.int64())), ("item_id", pa.int64()),
    ("likes_level", pa.int64()), ("views_level", pa.int64()), ("label", pa.float64()),
])
TEST_SCHEMA = pa.schema([pa.field("ID", pa.int64())] + [f for f in ROWS_SCHEMA if f.name != "label"])
ITEM_INFO_SCHEMA = pa.schema([
    ("item_id", pa.int64()), ("item_tags", pa.list_(pa.int64())), ("item_emb_d128", pa.list_(pa.float32())),
])
ITEM_FEATURE_SCHEMA = pa.schema([
    ("item_id", pa.int64()), ("item_title", pa.string()), ("item_tags", pa.list_(pa.int64())),
    ("likes_level", pa.int64()), ("views_level", pa.int64()),
])

_PARQUET_OPTS = dict(compression="zstd")
_ROW_CHUNK = 250_000     # rows per parquet row group (bounds the padded-history memory)
_IMAGE_BATCH = 1024

# Independent random streams, so e.g. the image batch size never changes the tables.
_STREAM_ITEMS, _STREAM_USERS, _STREAM_ROWS, _STREAM_IMAGES, _STREAM_BROKEN = range(5)


def _rng(seed: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *extra])


def _list_array(values: np.ndarray | pa.Array, lengths: np.ndarray) -> pa.ListArray:
    """list<...> column from flat values and per-row lengths (no per-row Python objects)."""
    return pa.ListArray.from_arrays(pa.array(_offsets(lengths).astype(np.int32)), values)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _positions(lengths: np.ndarray) -> np.ndarray:
    """Index of each flat element within its own list: [3, 2] -> [0, 1, 2, 0, 1]."""
    starts = _offsets(lengths)[:-1]
    return np.arange(int(lengths.sum())) - np.repeat(starts, lengths)


def _levels(score: np.ndarray) -> np.ndarray:
    """Deciles of ``score`` as levels 1..10."""
    ranks = np.argsort(np.argsort(score, kind="stable"), kind="stable")
    return (1 + ranks * 10 // len(score)).astype(np.int64)


def _zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------------------------------------
# Items


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


def _make_items(size: DemoSize, seed: int) -> _Items:
    rng = _rng(seed, _STREAM_ITEMS)
    n, k = size.n_items, size.n_topics
    topic_share = rng.dirichlet(np.full(k, 4.0))
    topic = np.concatenate([np.arange(k), rng.choice(k, n - k, p=topic_share)])  # every topic non-empty
    topic = rng.permutation(topic)  # item ids carry no topic information

    # Zipf-like popularity: rank within topic in a random order.
    order = np.lexsort((rng.random(n), topic))
    sorted_topic = topic[order]
    starts = np.searchsorted(sorted_topic, np.arange(k))
    rank = np.arange(n) - starts[sorted_topic]
    pop_sorted = (rank + 1.0) ** -0.9
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

    pad = lambda a, v: np.concatenate([[v], a])  # noqa: E731
    return _Items(
        topic=pad(topic, -1).astype(np.int64), likes=pad(likes, 0), views=pad(views, 0), z_pop=pad(z_pop, 0.0),
        cum_pop=cum_pop, order=order.astype(np.int64) + 1, topic_lo=topic_lo, topic_hi=topic_hi,
        topic_bias=TOPIC_BIAS_SD * rng.standard_normal(k),
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


# ---------------------------------------------------------------------------------------------
# Users and interaction rows


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


def _history_lengths(rng: np.random.Generator, n: int, max_len: int) -> np.ndarray:
    """3 + heavy-tailed extra: median ~6, mean ~8, max ``max_len`` (100 for the real data)."""
    extra = np.floor(rng.lognormal(mean=1.25, sigma=0.95, size=n)).astype(np.int64)
    return np.minimum(3 + extra, max_len)


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
    logit += _calibrate_bias(logit, POSITIVE_RATE)
    click_prob = _sigmoid(logit)
    label = (rng.random(n_rows) < click_prob).astype(np.float64)
    user_bias_out = None if world == "v1" else user_bias
    return _Rows(user=user, hist=hist, hist_len=hist_len, hist_off=hist_off, target=target,
                 click_prob=click_prob, label=label, target_interest=target_interest,
                 logit_without_user=logit - user_term, user_bias=user_bias_out)


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


# ---------------------------------------------------------------------------------------------
# Images


def _topic_palette(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground RGB (0..1) per topic; topics sharing a shape get distant hues."""
    t = np.arange(k)
    hues = ((t // 4 + 0.37 * (t % 4)) / -(-k // 4)) % 1.0
    bg = np.array([colorsys.hsv_to_rgb(h, 0.35, 0.9) for h in hues], dtype=np.float32)
    fg = np.array([colorsys.hsv_to_rgb((h + 0.5) % 1.0, 0.85, 0.55) for h in hues], dtype=np.float32)
    return bg, fg


def _cover_batch(topic: np.ndarray, size: int, rng: np.random.Generator,
                 palette: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """uint8 (B, S, S, 3) covers: topic colours and topic shape (circle/square/diamond/ring) + noise."""
    b = len(topic)
    bg = palette[0][topic] + rng.normal(0, 0.07, (b, 3)).astype(np.float32)
    fg = palette[1][topic] + rng.normal(0, 0.07, (b, 3)).astype(np.float32)
    cy, cx = (size * rng.uniform(0.3, 0.7, (2, b))).astype(np.float32)[:, :, None, None]
    r = (size * rng.uniform(0.2, 0.32, b)).astype(np.float32)[:, None, None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = np.abs(yy[None] - cy), np.abs(xx[None] - cx)
    dist = np.sqrt(dx**2 + dy**2)
    shape = (topic % 4)[:, None, None]
    mask = np.select(
        [shape == 0, shape == 1, shape == 2],
        [dist < r, np.maximum(dx, dy) < 0.85 * r, dx + dy < 1.2 * r],
        (dist < r) & (dist > 0.55 * r))
    img = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :])
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= 0.05
    img += noise
    img *= 255
    img += 0.5
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


def _write_images(folder: Path, size: DemoSize, items: _Items, seed: int, skip: np.ndarray,
                  progress: bool) -> None:
    """One task per batch of covers (numpy and JPEG encoding release the GIL); own RNG per batch."""
    folder.mkdir()
    palette = _topic_palette(size.n_topics)
    skip_set = np.zeros(size.n_items + 1, dtype=bool)
    skip_set[skip] = True
    ids = np.arange(1, size.n_items + 1)

    def write_batch(i: int) -> None:
        batch = ids[i * _IMAGE_BATCH:(i + 1) * _IMAGE_BATCH]
        pixels = _cover_batch(items.topic[batch], size.image_size, _rng(seed, _STREAM_IMAGES, i), palette)
        for item_id, px in zip(batch[~skip_set[batch]].tolist(), pixels[~skip_set[batch]]):
            buf = io.BytesIO()  # one write per file: much faster than PIL's buffered file writes
            Image.fromarray(px).save(buf, format="JPEG", quality=size.jpeg_quality)
            (folder / f"{item_id}.jpg").write_bytes(buf.getvalue())

    n_batches = -(-len(ids) // _IMAGE_BATCH)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(tqdm(pool.map(write_batch, range(n_batches)), total=n_batches, desc="item_images",
                  unit="batch", disable=not progress))


def _break_images(folder: Path, corrupt: np.ndarray, seed: int) -> None:
    """Half the corrupt files become truncated JPEGs, the other half random bytes."""
    rng = _rng(seed, _STREAM_BROKEN, 1)
    for i, item_id in enumerate(corrupt.tolist()):
        path = folder / f"{item_id}.jpg"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3] if i % 2 == 0 else rng.bytes(len(data)))


# ---------------------------------------------------------------------------------------------
# Public API


def _auc(labels: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, score)) if 0 < labels.sum() < len(labels) else None


def _resolve_size(size: str | DemoSize) -> DemoSize:
    if isinstance(size, DemoSize):
        return size
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; choose one of {sorted(SIZES)} "
                         "or pass a DemoSize (e.g. dataclasses.replace(SIZES['tiny'], n_items=500))")
    return SIZES[size]


def generate(root: str | os.PathLike, size: str | DemoSize = "small", seed: int = 0, *,
             overwrite: bool = False, progress: bool = True, world: str = "v2") -> dict:
    """Write a MicroLens-format demo dataset under ``root`` and return its manifest.

    ``world`` picks the click model: "v2" (default) plants recency and a per-user click
    propensity; "v1" is the earlier world, byte for byte, so old figures stay comparable (its
    manifest has no "world" key, like every dataset written before v2 existed).
    The dataset is built in a temp folder beside ``root`` and renamed into place at the end, so
    an interrupted run leaves no half dataset and an overwritten one stays intact until then.
    """
    size = _resolve_size(size)
    if world not in WORLDS:
        raise ValueError(f"unknown demo world {world!r}; choose one of {list(WORLDS)} "
                         "(v2: recency + per-user click propensity, the default; v1: the earlier world)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    seed = int(seed)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"demo data root {root} is a file; pass a folder path")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"demo data root {root} already exists and is not empty; pass "
                              "overwrite=True (CLI: --overwrite) to replace it, or choose another folder")

    log.info("generating %s demo data (world %s, seed %d) into %s", size.name, world, seed, root)
    items = _make_items(size, seed)
    rows = _make_rows(size, items, seed, world)
    rng = _rng(seed, _STREAM_BROKEN)
    n_broken = max(round(0.005 * size.n_items), 2 if size.n_items >= 100 else 0)
    broken = np.sort(rng.choice(np.arange(1, size.n_items + 1), 2 * n_broken, replace=False))
    broken = rng.permutation(broken)
    missing, corrupt = np.sort(broken[:n_broken]), np.sort(broken[n_broken:])

    n_tr, n_va, n_te = size.n_train, size.n_valid, size.n_test
    va, te = n_tr, n_tr + n_va
    test_ids = _rng(seed, _STREAM_ROWS, 1).permutation(n_te).astype(np.int64)  # ID is not the row number

    with atomic_path(root) as tmp:
        data = tmp / DATASET_DIR
        truth = tmp / GROUND_TRUTH_DIR
        data.mkdir(parents=True)
        truth.mkdir()
        for name, lo, hi, schema, ids in [("train", 0, va, ROWS_SCHEMA, None),
                                          ("valid", va, te, ROWS_SCHEMA, None),
                                          ("test", te, te + n_te, TEST_SCHEMA, test_ids)]:
            log.info("writing %s.parquet (%d rows)", name, hi - lo)
            _write_rows(tmp / TABLES[name].relpath, rows, items, lo, hi, size.seq_len, schema, progress, ids)

        tags, n_tags = _item_tags(size, items, seed)
        tag_off = _offsets(n_tags)
        # item_info keeps each item's first 5 tags, left-padded with 0; row 0 is the padding item.
        info_tags = np.zeros((size.n_items + 1, N_INFO_TAGS), dtype=np.int64)
        n_info = np.minimum(n_tags, N_INFO_TAGS)
        first = tags[np.repeat(tag_off[:-1], n_info) + _positions(n_info)]
        info_tags[1:][np.arange(N_INFO_TAGS)[None, :] >= N_INFO_TAGS - n_info[:, None]] = first
        emb = _organiser_embedding(size, items, seed)
        item_ids = np.arange(size.n_items + 1, dtype=np.int64)
        pq.write_table(pa.table({
            "item_id": item_ids,
            "item_tags": _list_array(info_tags.ravel(), np.full(size.n_items + 1, N_INFO_TAGS)),
            "item_emb_d128": _list_array(emb.ravel(), np.full(size.n_items + 1, EMB_DIM)),
        }, schema=ITEM_INFO_SCHEMA), tmp / TABLES["item_info"].relpath, **_PARQUET_OPTS)
        pq.write_table(pa.table({
            "item_id": item_ids[1:], "item_title": _titles(size, items, seed),
            "item_tags": _list_array(tags, n_tags),
            "likes_level": items.likes[1:], "views_level": items.views[1:],
        }, schema=ITEM_FEATURE_SCHEMA), tmp / TABLES["item_feature"].relpath, **_PARQUET_OPTS)

        log.info("writing %d cover images", size.n_items - len(missing))
        _write_images(tmp / IMAGES_DIR, size, items, seed, missing, progress)
        _break_images(tmp / IMAGES_DIR, corrupt, seed)

        # v2 adds the click probability without the user term: the best a model can do
        # without learning each user's propensity (ranking-equivalent to E[p | all but the user]).
        no_user = {} if world == "v1" else {"click_prob_without_user_bias": _sigmoid(rows.logit_without_user)}
        pq.write_table(pa.table({"row": np.arange(n_va, dtype=np.int64), "click_prob": rows.click_prob[va:te]}
                                | {k: v[va:te] for k, v in no_user.items()}),
                       truth / "valid.parquet")
        pq.write_table(pa.table({"ID": test_ids, "click_prob": rows.click_prob[te:]}
                                | {k: v[te:] for k, v in no_user.items()} | {"label": rows.label[te:]}),
                       truth / "test.parquet")
        if rows.user_bias is not None:
            pq.write_table(pa.table({"user_id": np.arange(1, size.n_users + 1, dtype=np.int64),
                                     "click_bias": rows.user_bias}), truth / "users.parquet")
        pq.write_table(pa.table({"item_id": item_ids[1:], "topic": items.topic[1:]}), truth / "items.parquet")

        manifest = {
            "format": "MicroLens_1M_x1 (synthetic demo)",
            "size": dataclasses.asdict(size),
            "seed": seed,
            "counts": {"items": size.n_items, "users": size.n_users, "topics": size.n_topics,
                       "train": n_tr, "valid": n_va, "test": n_te,
                       "images_written": size.n_items - len(missing)},
            "missing_image_ids": missing.tolist(),
            "corrupt_image_ids": corrupt.tolist(),
            "best_valid_auc": _auc(rows.label[va:te], rows.click_prob[va:te]),
            "best_test_auc": _auc(rows.label[te:], rows.click_prob[te:]),
            "positive_rate": {"train": float(rows.label[:va].mean()), "valid": float(rows.label[va:te].mean()),
                              "test": float(rows.label[te:].mean())},
            "history_length": {"min": int(rows.hist_len.min()), "median": float(np.median(rows.hist_len)),
                               "mean": float(rows.hist_len.mean()), "max": int(rows.hist_len.max())},
            "target_interest_share": float(rows.target_interest.mean()),
            "click_model": {"affinity": W_AFFINITY, "likes": W_LIKES, "views": W_VIEWS,
                            "popularity": W_POPULARITY, "topic_bias_sd": TOPIC_BIAS_SD,
                            "history_interest_share": HISTORY_INTEREST_SHARE,
                            "target_interest_share": TARGET_INTEREST_SHARE},
        }
        if world != "v1":
            manifest = _v2_manifest(manifest, rows, va, te)
        (truth / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("demo data ready in %s (best valid AUC %.4f)", root, manifest["best_valid_auc"] or float("nan"))
    return manifest


def _v2_manifest(manifest: dict, rows: _Rows, va: int, te: int) -> dict:
    """v2's manifest: the world, the ceilings with and without the per-user term, its click model."""
    head = {k: manifest[k] for k in ("format",)} | {"world": "v2"}
    no_user = _sigmoid(rows.logit_without_user)  # as written to ground_truth (same ties)
    ceilings = {
        "best_valid_auc": manifest["best_valid_auc"],
        "best_valid_auc_without_user_bias": _auc(rows.label[va:te], no_user[va:te]),
        "best_test_auc": manifest["best_test_auc"],
        "best_test_auc_without_user_bias": _auc(rows.label[te:], no_user[te:]),
    }
    click_model = {"affinity": V2_W_AFFINITY, "recent_match": V2_W_RECENT, "recency_decay": RECENCY_DECAY,
                   "user_bias_sd": USER_BIAS_SD, "likes": W_LIKES, "views": W_VIEWS,
                   "popularity": W_POPULARITY, "topic_bias_sd": TOPIC_BIAS_SD,
                   "history_interest_share": HISTORY_INTEREST_SHARE, "topic_stay": V2_TOPIC_STAY,
                   "target_recent_share": V2_TARGET_RECENT_SHARE,
                   "target_interest_share": V2_TARGET_INTEREST_SHARE}
    rest = {k: v for k, v in manifest.items() if k not in head and k not in ceilings and k != "click_model"}
    return head | rest | ceilings | {"click_model": click_model}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmctr-demo-data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset root folder to create")
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", default="v2", choices=WORLDS,
                        help="click model: v2 (recency + per-user propensity, default) or v1 (the earlier world)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    for field in dataclasses.fields(DemoSize):
        if field.name != "name":
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=None,
                                help=f"override the size's {field.name}")
    args = parser.parse_args(argv)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoSize)
                 if f.name != "name" and getattr(args, f.name) is not None}
    try:
        size = dataclasses.replace(SIZES[args.size], **overrides)
        manifest = generate(args.out, size, args.seed, overwrite=args.overwrite, progress=not args.quiet,
                            world=args.world)
    except (ValueError, FileExistsError, NotADirectoryError) as err:
        print(f"mmctr-demo-data: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("world", "counts", "best_valid_auc",
                                                "best_valid_auc_without_user_bias", "positive_rate")
                      if k in manifest}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
