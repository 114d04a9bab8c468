"""The demo generator's constants, sizes, output schemas and small array helpers (shared by its
modules; nothing here reads or writes files)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

EMB_DIM = 128
N_INFO_TAGS = 5
MAX_ITEM_TAGS = 8
POSITIVE_RATE = 0.25

# Topic themes: (title words, hashtags). Topic t uses theme t, so n_topics <= len(THEMES).
THEMES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("baking", "recipe", "homemade", "bread", "cake", "cozy", "kitchen", "dinner", "pasta", "dessert"),
     ("#food", "#recipe")),
    (("beach", "sunset", "journey", "island", "mountains", "roadtrip", "hotel", "city", "explore", "backpack"),
     ("#travel", "#wanderlust")),
    (("workout", "gym", "squat", "cardio", "abs", "training", "muscle", "stretch", "running", "sweat"),
     ("#fitness", "#gym")),
    (("gameplay", "boss", "level", "speedrun", "console", "controller", "quest", "multiplayer", "loot", "pixel"),
     ("#gaming", "#gamer")),
    (("puppy", "kitten", "dog", "cat", "paws", "fluffy", "adorable", "bark", "leash", "treats"),
     ("#pets", "#cute")),
    (("guitar", "piano", "cover", "song", "melody", "concert", "beat", "vocals", "drums", "chorus"),
     ("#music", "#cover")),
    (("outfit", "dress", "sneakers", "style", "jacket", "lookbook", "denim", "vintage", "accessories", "runway"),
     ("#fashion", "#ootd")),
    (("makeup", "lipstick", "skincare", "eyeliner", "foundation", "glow", "tutorial", "serum", "blush", "nails"),
     ("#beauty", "#makeup")),
    (("smartphone", "unboxing", "laptop", "gadget", "review", "camera", "battery", "charger", "specs", "headphones"),
     ("#tech", "#unboxing")),
    (("engine", "drift", "supercar", "garage", "turbo", "racing", "wheels", "exhaust", "sedan", "horsepower"),
     ("#cars", "#automotive")),
    (("prank", "funny", "sketch", "joke", "laugh", "parody", "blooper", "roast", "skit", "meme"),
     ("#comedy", "#funny")),
    (("choreography", "moves", "dancer", "hiphop", "ballet", "routine", "groove", "spin", "shuffle", "tango"),
     ("#dance", "#dancechallenge")),
    (("plants", "garden", "flowers", "seeds", "soil", "harvest", "tomatoes", "succulent", "greenhouse", "compost"),
     ("#gardening", "#plants")),
    (("crafts", "handmade", "woodwork", "paint", "glue", "project", "upcycle", "sewing", "knitting", "decor"),
     ("#diy", "#crafts")),
    (("experiment", "chemistry", "physics", "rocket", "microscope", "reaction", "lab", "atoms", "magnet", "planet"),
     ("#science", "#stem")),
    (("football", "goal", "basketball", "dunk", "match", "stadium", "highlights", "tennis", "soccer", "champion"),
     ("#sports", "#highlights")),
    (("notes", "exam", "lecture", "homework", "library", "studying", "productivity", "planner", "college", "focus"),
     ("#study", "#studygram")),
    (("baby", "toddler", "family", "mom", "dad", "bedtime", "playtime", "kids", "nursery", "stroller"),
     ("#parenting", "#family")),
    (("anime", "manga", "cosplay", "character", "episode", "otaku", "sketchbook", "chibi", "fanart", "opening"),
     ("#anime", "#manga")),
    (("forest", "river", "waterfall", "wildlife", "birds", "hiking", "camping", "lake", "meadow", "trail"),
     ("#nature", "#outdoors")),
    (("money", "investing", "stocks", "budget", "savings", "crypto", "trading", "income", "wealth", "taxes"),
     ("#finance", "#money")),
    (("espresso", "latte", "barista", "beans", "brew", "cappuccino", "cafe", "roasting", "mug", "pourover"),
     ("#coffee", "#cafe")),
    (("painting", "canvas", "watercolor", "portrait", "brush", "gallery", "acrylic", "drawing", "mural", "easel"),
     ("#art", "#artist")),
    (("lens", "shutter", "lighting", "editing", "tripod", "goldenhour", "film", "aperture", "drone", "photoshoot"),
     ("#photography", "#photo")),
    (("cleaning", "organizing", "apartment", "interior", "bedroom", "makeover", "minimalist", "furniture", "laundry",
      "tidy"),
     ("#home", "#cleantok")),
    (("fishing", "bait", "catch", "boat", "rod", "trout", "ocean", "pier", "reel", "lure"),
     ("#fishing", "#angler")),
    (("ancient", "castle", "museum", "empire", "medieval", "ruins", "war", "documentary", "legend", "archive"),
     ("#history", "#documentary")),
    (("streetfood", "noodles", "dumplings", "spicy", "grill", "market", "skewers", "ramen", "tacos", "snack"),
     ("#streetfood", "#foodie")),
    (("galaxy", "stars", "telescope", "moon", "nebula", "astronaut", "orbit", "eclipse", "comet", "cosmos"),
     ("#space", "#astronomy")),
    (("bicycle", "cycling", "helmet", "pedal", "downhill", "bmx", "tour", "spokes", "saddle", "sprint"),
     ("#cycling", "#bike")),
    (("wedding", "bride", "groom", "vows", "bouquet", "ceremony", "rings", "reception", "veil", "honeymoon"),
     ("#wedding", "#love")),
    (("magic", "trick", "illusion", "cards", "magician", "reveal", "sleight", "vanish", "mystery", "wand"),
     ("#magic", "#illusion")),
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
V2_W_AFFINITY = 1.5       # long-term interest weight in the target's topic (as W_AFFINITY in v1)
V2_W_RECENT = 2.5         # times the recency-weighted share of history items in the target's topic
RECENCY_DECAY = 0.6       # weight of a history item at distance d from the most recent: 0.6 ** d
V2_TOPIC_STAY = 0.7       # chance the next history item continues the current session's topic
V2_TARGET_RECENT_SHARE = 0.25    # targets from the current session's topic (the last history item's)
V2_TARGET_INTEREST_SHARE = 0.25  # targets from the user's long-term interests
USER_BIAS_SD = 0.6        # per-user click propensity: logit offset ~ N(0, USER_BIAS_SD)
POPULARITY_EXPONENT = 0.9  # v1/v2: Zipf exponent of exposure by an item's rank within its topic

# World v3 (`world="v3"`): v2 plus what real logs have and v2 lacks. Each item has a latent appeal
# (a click logit offset) drawn independently of its topic, popularity, levels, tags, title, cover
# and organisers' embedding, so only a model that learns item ids can recover it (from the item's
# clicks). Exposure has a long tail: Zipf over one global rank, so a few items take a large share
# of the rows. The most active users have long histories (median about V3_HEAVY_HISTORY_MEDIAN).
WORLDS = ("v1", "v2", "v3")
V3_ITEM_APPEAL_SD = 0.8          # per-item click appeal: logit offset ~ N(0, V3_ITEM_APPEAL_SD)
V3_POPULARITY_EXPONENT = 1.0     # Zipf exponent of exposure by an item's global popularity rank
V3_HEAVY_USER_SHARE = 0.3        # the most active users (by activity) with long histories
V3_HEAVY_HISTORY_MEDIAN = 60     # their history length: lognormal around this, capped at seq_len
V3_HEAVY_HISTORY_SIGMA = 0.45
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
# the real download's precomputed vectors (item_feature) and organiser embeddings (item_emb.parquet)
PRECOMPUTED_DIMS = {"txt_emb_BERT": 768, "img_emb_CLIPRN50": 1024}
ITEM_EMB_VERSIONS = ("item_emb_d128_v1", "item_emb_d128_v2", "item_emb_d128_v3", "item_emb_d128_e4")
ITEM_FEATURE_SCHEMA = pa.schema([
    ("item_id", pa.int64()), ("item_title", pa.string()), ("item_tags", pa.list_(pa.int64())),
    ("likes_level", pa.int64()), ("views_level", pa.int64()),
] + [(c, pa.list_(pa.float32())) for c in PRECOMPUTED_DIMS])
ITEM_EMB_SCHEMA = pa.schema([("item_id", pa.int64())] + [(c, pa.list_(pa.float32())) for c in ITEM_EMB_VERSIONS])

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
