"""item2vec: skip-gram Word2Vec over users' click histories -> one collaborative vector per item.

Items clicked by the same users end up close together, which is the collaborative signal CLIP's
content vectors lack. The corpus (one line per user timeline, see build_corpus) is written as a
LineSentence text file by polars (columnar, no Python loop over rows) and gensim trains on it in
``corpus_file`` mode (C++ reader, all workers busy, no Python iteration); the vocabulary comes
from polars counts instead of gensim's Python scan of the file.

Reproducibility: with ``workers=1`` the vectors are bit-identical for the same corpus, arguments
and seed, in any process (gensim 4 seeds weights from ``seed`` and the vocabulary is built in a
fixed order here, so PYTHONHASHSEED does not matter). With ``workers>1`` threads update shared
weights without locks (Hogwild), so vectors differ slightly run to run, not in quality. The
default is therefore one worker; more is an explicit choice of speed over reproducibility.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from mmctr_assets.lib.io import atomic_path

TRAIN_COLUMNS = ("item_seq", "item_id", "label")


@dataclass(frozen=True)
class CorpusStats:
    path: Path
    n_rows: int  # training rows read
    n_sentences: int  # lines written (>= 2 tokens)
    n_tokens: int
    n_items: int  # distinct items in the corpus
    n_targets_appended: int  # clicked targets written
    seconds: float
    n_rows_merged: int = 0  # rows folded into their user's timeline line (one_line_per_user)


@dataclass(frozen=True)
class Item2VecResult:
    item_ids: np.ndarray  # int64 [n], ascending
    vectors: np.ndarray  # float32 [n, dim], row i belongs to item_ids[i]; not normalised
    seconds_train: float
    seconds_vocab: float
    n_sentences: int
    n_tokens: int
    n_below_min_count: int  # items in the corpus dropped by min_count (no vector)
    params: dict = field(default_factory=dict)


def _train_batches(train, batch_rows: int, needed: tuple[str, ...]) -> Iterator[pl.DataFrame]:
    """The train split in row batches, so its padded histories (3.6M x 100 ids) are never held whole."""
    if isinstance(train, pl.LazyFrame):
        train = train.collect()
    if isinstance(train, pl.DataFrame):
        columns = train.columns
    else:
        path = Path(train)
        if not path.is_file():
            raise FileNotFoundError(f"train parquet {path} does not exist; materialise raw_train first.")
        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(
            f"build_corpus needs train columns {list(needed)}; missing {missing}. Pass MicroLens "
            "train.parquet (user_id int64, item_seq list<int64>, item_id int64, label 0/1)"
            + (" or one_line_per_user=False, which needs no user_id." if "user_id" in missing else ".")
        )
    if isinstance(train, pl.DataFrame):
        yield from train.select(needed).iter_slices(batch_rows)
        return
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(needed)):
        yield pl.from_arrow(batch)


def build_corpus(
    train: str | os.PathLike | pl.DataFrame | pl.LazyFrame,
    out_path: str | os.PathLike,
    include_clicked_target: bool = True,
    *,
    one_line_per_user: bool = True,
    batch_rows: int = 1 << 16,
) -> CorpusStats:
    """Write the item2vec corpus: lines of item ids separated by spaces, padding 0 never written.

    ``one_line_per_user`` (default): in a click log a user's rows are successive prefixes of one
    timeline (each row's history is what the user clicked before that impression). One line per
    row would repeat a user's early clicks once per later row, weighting co-occurrences by how
    often the user was shown something, and costs tokens: 29.6M instead of 13.1M on the full-size
    demo data (gensim's time is proportional to them). So every row whose history is a prefix of
    its user's longest history is folded into one line per user: that longest history, with each
    clicked target placed where its row's history ends (not written twice when the timeline
    already continues with it). A history that is no such prefix (a truncated window, a reordered
    log) stays a line of its own.
    ``one_line_per_user=False``: one line per row, as the notebook did.

    ``include_clicked_target`` adds the target when label == 1: a click is the strongest
    co-occurrence signal there is, and without it items that only ever appear as targets (common
    for new items) would get no vector. Non-clicked targets are left out: an impression the user
    skipped says they do not belong with the history. Lines with fewer than two items are
    dropped (no context to learn from). Rows are read ``batch_rows`` at a time and kept without
    their padding (the padded histories alone would double the peak; docs/results.md).
    """
    started = time.perf_counter()
    history = pl.col("item_seq").cast(pl.List(pl.Int64)).list.eval(pl.element().filter(pl.element() != 0))
    clicked = ((pl.col("label") == 1) & (pl.col("item_id") != 0)) if include_clicked_target else pl.lit(False)
    needed = TRAIN_COLUMNS + (("user_id",) if one_line_per_user else ())
    rows, n_rows = [], 0
    for batch in _train_batches(train, batch_rows, needed):
        rows.append(batch.select(
            pl.int_range(n_rows, n_rows + batch.height, dtype=pl.Int64).alias("row"),
            (pl.col("user_id").cast(pl.Int64) if one_line_per_user else pl.lit(None, pl.Int64)).alias("user"),
            history.alias("history"),
            pl.col("item_id").cast(pl.Int64).alias("target"),
            clicked.alias("clicked"),
        ))
        n_rows += batch.height
    frame = pl.concat(rows) if rows else pl.DataFrame(
        schema={"row": pl.Int64, "user": pl.Int64, "history": pl.List(pl.Int64), "target": pl.Int64,
                "clicked": pl.Boolean})
    del rows
    lines, n_merged = (_user_lines if one_line_per_user else _row_lines)(frame)
    n_targets = int(lines["n_targets"].sum() or 0)
    lines = lines.filter(pl.col("tokens").list.len() >= 2)

    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, open(tmp, "wb") as out:
        lines.select(pl.col("tokens").list.eval(pl.element().cast(pl.String)).list.join(" ")).write_csv(
            out, include_header=False, quote_style="never")
    return CorpusStats(
        path=out_path,
        n_rows=n_rows,
        n_sentences=lines.height,
        n_tokens=int(lines["tokens"].list.len().sum()),
        n_items=lines["tokens"].explode().n_unique() if lines.height else 0,
        n_targets_appended=n_targets,
        seconds=time.perf_counter() - started,
        n_rows_merged=n_merged,
    )


# a row's own line: its history, then its target when clicked
_ROW_LINE = (pl.when("clicked").then(pl.concat_list("history", "target")).otherwise("history").alias("tokens"),
             pl.col("clicked").cast(pl.Int64).alias("n_targets"))


def _row_lines(frame: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """One line per row, in row order."""
    return frame.select(*_ROW_LINE), 0


def _user_lines(frame: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """One line per user timeline (see build_corpus), rows that are no prefix of it on their own.

    Lines come in the order of their first row, so the corpus, and with one gensim worker the
    vectors, depend only on the table.
    """
    frame = frame.with_columns(pl.col("history").list.len().alias("n"))
    longest = frame.group_by("user").agg(
        pl.col("history").get(pl.col("n").arg_max()).alias("timeline"), pl.col("row").min().alias("first_row"))
    frame = frame.join(longest, on="user", how="left").with_columns(
        (pl.col("history") == pl.col("timeline").list.head(pl.col("n"))).alias("merged"))
    merged, alone = frame.filter("merged"), frame.filter(~pl.col("merged"))

    # a timeline's items at even keys 2*i, a clicked target after its row's history at 2*n - 1
    timeline_items = longest.select(
        pl.col("first_row").alias("order"),
        pl.col("timeline").alias("token"),
        (pl.int_ranges(0, pl.col("timeline").list.len(), dtype=pl.Int64) * 2).alias("key"),
    ).explode("token", "key").drop_nulls("token").with_columns(pl.lit(-1, pl.Int64).alias("row"))
    next_item = pl.col("timeline").list.get(pl.col("n"), null_on_oob=True)
    targets = merged.filter(pl.col("clicked") & (next_item.is_null() | (next_item != pl.col("target")))).select(
        pl.col("first_row").alias("order"),
        pl.col("target").alias("token"),
        (2 * pl.col("n").cast(pl.Int64) - 1).alias("key"),
        "row",
    )
    timelines = (
        pl.concat([timeline_items, targets])
        .sort("order", "key", "row")
        .group_by("order", maintain_order=True)
        .agg(pl.col("token").alias("tokens"), (pl.col("row") >= 0).sum().cast(pl.Int64).alias("n_targets"))
        .with_columns(pl.lit(0).alias("kind"))
    )
    own = alone.select(pl.col("row").alias("order"), *_ROW_LINE, pl.lit(1).alias("kind"))
    lines = pl.concat([timelines, own]).sort("order", "kind").select("tokens", "n_targets")
    return lines, merged.height


def corpus_counts(corpus_path: str | os.PathLike) -> tuple[pl.DataFrame, int]:
    """Token frequencies of a LineSentence file (token str, count) sorted by token, and line count."""
    path = Path(corpus_path)
    if not path.is_file():
        raise FileNotFoundError(f"item2vec corpus {path} does not exist; run build_corpus first.")
    lines = pl.scan_csv(path, has_header=False, new_columns=["line"], separator="\t",
                        schema={"line": pl.String}, quote_char=None)
    # streaming: a fraction of the eager split+explode's memory and time (docs/results.md)
    counts = (
        lines.select(pl.col("line").str.split(" ").explode().alias("token"))
        .filter(pl.col("token") != "")
        .group_by("token")
        .len("count")
        .sort("token")
        .collect(engine="streaming")
    )
    return counts, lines.select(pl.len()).collect(engine="streaming").item()


def train_item2vec(
    corpus_path: str | os.PathLike,
    *,
    dim: int = 128,
    window: int = 5,
    min_count: int = 1,
    epochs: int = 5,
    negative: int = 5,
    workers: int = 1,
    seed: int = 0,
    sample: float = 1e-3,
) -> Item2VecResult:
    """Train skip-gram (sg=1) Word2Vec on a corpus from :func:`build_corpus`.

    Items that never appear (or appear fewer than ``min_count`` times) get no vector; the
    caller reports how many.
    """
    from gensim.models import Word2Vec

    started = time.perf_counter()
    counts, n_sentences = corpus_counts(corpus_path)
    if counts.is_empty():
        raise ValueError(f"item2vec corpus {corpus_path} has no tokens; is the train split empty?")
    bad = counts.filter(~pl.col("token").str.contains(r"^[0-9]+$"))["token"]
    if len(bad):
        raise ValueError(f"item2vec corpus {corpus_path} holds tokens that are not item ids, e.g. "
                         f"{bad.head(5).to_list()}; build it with build_corpus.")
    if (counts["token"] == "0").any():
        raise ValueError(
            f"item2vec corpus {corpus_path} contains the padding id 0 as a token; padding must never "
            "be embedded. Rebuild it with build_corpus, which drops padding."
        )
    n_tokens = int(counts["count"].sum())
    model = Word2Vec(
        vector_size=dim, window=window, min_count=min_count, sg=1, negative=negative,
        workers=workers, seed=seed, epochs=epochs, sample=sample,
    )
    model.build_vocab_from_freq(dict(zip(counts["token"].to_list(), counts["count"].to_list())),
                                corpus_count=n_sentences)
    seconds_vocab = time.perf_counter() - started
    t = time.perf_counter()
    model.train(corpus_file=str(corpus_path), total_words=n_tokens, total_examples=n_sentences,
                epochs=epochs)
    seconds_train = time.perf_counter() - t

    keys = model.wv.index_to_key
    ids = np.asarray(keys).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    return Item2VecResult(
        item_ids=ids[order],
        vectors=np.asarray(model.wv.vectors, dtype=np.float32)[order],
        seconds_train=seconds_train,
        seconds_vocab=seconds_vocab,
        n_sentences=n_sentences,
        n_tokens=n_tokens,
        n_below_min_count=counts.height - len(keys),
        params=dict(dim=dim, window=window, min_count=min_count, epochs=epochs, negative=negative,
                    workers=workers, seed=seed, sample=sample, sg=1),
    )


def to_frame(result: Item2VecResult) -> pl.DataFrame:
    """item2vec_embeddings parquet layout: item_id int64, i2v_emb Array(Float32, dim)."""
    return pl.DataFrame({"item_id": pl.Series(result.item_ids, dtype=pl.Int64),
                         "i2v_emb": pl.Series(result.vectors)})
