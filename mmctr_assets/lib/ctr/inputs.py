"""Task 2's model inputs, assembled in one place: the train/valid frames, the item table chosen by
``embedding_source``, the item tags and per-item likes/views levels, the data's fingerprints and the
tensors. dcn_din_model, task1_score and ctr_tuning all read their inputs through :func:`read_inputs`
(predictions reads the test frame through :func:`fill_row_levels`), so a new input is added here once
and every trainer sees the same one.

Dagster-free: the caller passes the raw snapshots' reader (``ProjectStorage`` has the methods
:class:`RawSnapshots` names) and a function that builds the item table of a source (the fused
table needs the Task 1 assets' files, which defs/embeddings.py knows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

from mmctr_assets.lib.ctr import tensors
from mmctr_assets.lib.ctr.tensors import CTRTensors
from mmctr_assets.lib.io import array_fingerprint, file_fingerprint, text_fingerprint

LEVELS = ("likes_level", "views_level")


class RawSnapshots(Protocol):
    """What the assembly reads: the raw_* snapshots (``ProjectStorage`` is one)."""

    def raw(self, table: str) -> Path: ...

    def read_raw(self, table: str, columns: list[str] | None = None) -> pl.DataFrame: ...


@dataclass(frozen=True)
class Fingerprints:
    """Content hashes of a training's inputs."""

    train: str
    valid: str
    table: str  # the frozen item table the model reads
    item_info: str  # raw_item_info: which items exist (a rollback must match it)
    source: str  # embedding_source
    levels: str = ""  # the per-item levels, when the model or a filled row read them ("" otherwise)

    @property
    def data(self) -> str:
        """train + valid: the rows, whatever item table is used."""
        return text_fingerprint(self.train, self.valid)

    @property
    def run(self) -> str:
        """Everything that decides the trained weights besides the configs (resumes compare it)."""
        return text_fingerprint(self.train, self.valid, self.table, self.source,
                                *([self.levels] if self.levels else []))

    def sample(self, train_rows: int) -> str:
        """A tuning study's data: these inputs with a ``train_rows`` sample of the training rows."""
        return text_fingerprint(self.train, self.valid, self.table, self.source, f"train_rows={train_rows}",
                                *([self.levels] if self.levels else []))


@dataclass
class ModelInputs:
    """Everything a CTR training reads besides its configs."""

    frames: dict[str, pl.DataFrame]  # train and valid, null row levels filled from the item levels
    source: str  # embedding_source
    item_table: np.ndarray  # [n_items + 1, d] float32, row 0 padding
    item_tags: np.ndarray  # [n_items + 1, k] int64, 0 = no tag
    item_levels: np.ndarray | None  # [n_items + 1, 2] int64 (likes, views), row 0 padding; None: see below
    levels_problem: str  # why item_levels is None ("" when it is not)
    fingerprints: Fingerprints  # levels unset: fingerprints_for(model_config) adds them where read

    @property
    def n_items(self) -> int:
        return self.item_table.shape[0] - 1

    @property
    def history_width(self) -> int:
        """History positions the training rows hold: the most a model's max_len can read."""
        return tensors.history_width(self.frames["train"])

    def tensors(self, max_len: int, level_vocab_size: int) -> tuple[CTRTensors, CTRTensors]:
        """(train, valid) tensors cut to ``max_len``, ids and levels range-checked against the tables."""
        train_t, valid_t = (tensors.to_tensors(self.frames[t], max_len, n_items=self.n_items,
                                               level_vocab_size=level_vocab_size) for t in ("train", "valid"))
        return train_t, valid_t

    def model_tables(self, model_config) -> dict[str, np.ndarray | None]:
        """The per-item tables the model of ``model_config`` reads (``trainer.train``'s keywords)."""
        return {"item_tags": self.item_tags if model_config.use_tag_embedding else None,
                "item_levels": self.levels_for(model_config)}

    def levels_for(self, model_config) -> np.ndarray | None:
        if not getattr(model_config, "use_item_levels", False):
            return None
        if self.item_levels is None:
            raise ValueError(f"model option use_item_levels needs per-item levels: {self.levels_problem} "
                             "Set model.use_item_levels: false, or supply item_feature.parquet with likes_level "
                             "and views_level for every item and materialise raw_item_feature.")
        return self.item_levels

    def fingerprints_for(self, model_config) -> Fingerprints:
        """The fingerprints, the item levels included where this model reads them (an unchanged
        model's fingerprints stay what they were before the levels existed)."""
        if self.levels_for(model_config) is None and not self.fingerprints.levels:
            return self.fingerprints
        return dataclasses.replace(self.fingerprints, levels=array_fingerprint(self.item_levels))


def item_levels(item_feature: pl.DataFrame, n_items: int, max_level: int) -> np.ndarray:
    """item_feature's per-item ``likes_level``/``views_level`` as a ``[n_items + 1, 2]`` int64 table
    (row 0, the padding item, zeros). Raises ``ValueError`` naming what is wrong unless every item
    1..n_items has both levels, integers in 0..max_level."""
    missing = [c for c in LEVELS if c not in item_feature.columns]
    if item_feature.height == 0 or missing:
        why = f"no columns {missing}" if item_feature.height else "no rows: item_feature.parquet absent"
        raise ValueError(f"raw_item_feature has no per-item levels ({why}).")
    frame = item_feature.select("item_id", *LEVELS).filter(pl.col("item_id") != 0)
    ids = frame.get_column("item_id")
    problems = []
    outside = ids.filter((ids < 1) | (ids > n_items))
    if len(outside):
        problems.append(f"{len(outside):,} item ids outside item_info's 1..{n_items} (e.g. {outside[0]})")
    if ids.n_unique() != len(ids):
        problems.append(f"{len(ids) - ids.n_unique():,} duplicated item ids")
    absent = np.setdiff1d(np.arange(1, n_items + 1), ids.to_numpy())
    if absent.size:
        problems.append(f"{absent.size:,} of item_info's {n_items:,} items have no row (e.g. item {absent[0]})")
    for c in LEVELS:
        s = frame.get_column(c)
        bad = s.is_null() | (s < 0) | (s > max_level)
        if bad.any():
            problems.append(f"{int(bad.sum()):,} {c} values null or outside 0..{max_level} "
                            f"(e.g. item {ids.filter(bad)[0]}: {s.filter(bad)[0]})")
    if problems:
        raise ValueError("raw_item_feature's per-item levels do not fit item_info: " + "; ".join(problems) + ".")
    table = np.zeros((n_items + 1, 2), dtype=np.int64)
    table[ids.to_numpy()] = frame.select(*LEVELS).to_numpy().astype(np.int64)
    return table


def stored_item_levels(store: RawSnapshots, n_items: int, max_level: int) -> np.ndarray:
    """:func:`item_levels` of the raw_item_feature snapshot, reading only its id and level columns
    (the real file also holds 1,792 floats per item)."""
    path = store.raw("item_feature")
    if not path.exists():
        raise ValueError("raw_item_feature has not been materialised.")
    columns = [c for c in ("item_id", *LEVELS) if c in pl.read_parquet_schema(path)]
    return item_levels(store.read_raw("item_feature", columns=columns), n_items, max_level)


def fill_row_levels(frame: pl.DataFrame, levels: np.ndarray | None, name: str) -> pl.DataFrame:
    """``frame`` with each null row ``likes_level``/``views_level`` replaced by its target item's
    level from ``levels`` (:func:`item_levels`): a row that lacks its own levels reads the item's.
    Unchanged when nothing is null; a ``ValueError`` names the rows when there is no table to fill from."""
    nulls = {c: frame.get_column(c).null_count() for c in LEVELS if c in frame.columns}
    if not any(nulls.values()):
        return frame
    if levels is None:
        raise ValueError(f"{name}: null levels {({c: n for c, n in nulls.items() if n})} and no per-item levels "
                         "to fill them from (raw_item_feature has none): fill them in the source table or drop "
                         "those rows.")
    target = frame.get_column("item_id").to_numpy()
    return frame.with_columns(
        pl.col(c).fill_null(pl.Series(c, levels[np.clip(target, 0, len(levels) - 1), i]))
        for i, c in enumerate(LEVELS) if nulls.get(c))


def read_inputs(store: RawSnapshots, source: str, item_table: Callable[[str], np.ndarray], *, max_level: int,
                train_rows: int | None = None, seed: int = 0) -> ModelInputs:
    """Read a training's inputs: raw_train (a seeded ``train_rows`` sample when it holds more) and
    raw_valid, the item table of ``source`` (``item_table(source)``), item_info's tags and, when
    raw_item_feature has them for every item, the per-item levels (null row levels are filled from
    them). Fingerprints are of the files as stored, so a sample or a fill never changes them."""
    frames = {t: store.read_raw(t) for t in ("train", "valid")}
    if train_rows is not None and frames["train"].height > train_rows:
        frames["train"] = frames["train"].sample(train_rows, seed=seed)
    emb = item_table(source)
    n_items = emb.shape[0] - 1
    tags = store.read_raw("item_info", columns=["item_tags"]).get_column("item_tags")
    tags = tags.list.to_array(tags.list.len().max()).to_numpy()
    levels, problem = None, ""
    try:
        levels = stored_item_levels(store, n_items, max_level)
    except ValueError as e:
        problem = str(e)
    filled = {t: fill_row_levels(f, levels, f"raw_{t}") for t, f in frames.items()}
    fp = Fingerprints(file_fingerprint(store.raw("train")), file_fingerprint(store.raw("valid")),
                      array_fingerprint(emb), file_fingerprint(store.raw("item_info")), source)
    if any(filled[t] is not frames[t] for t in frames):  # the filled rows read the item levels
        fp = dataclasses.replace(fp, levels=array_fingerprint(levels))
    return ModelInputs(filled, source, emb, tags, levels, problem, fp)


def read_test(store: RawSnapshots, model, max_level: int) -> pl.DataFrame:
    """raw_test as ``model`` (a CTRModel) reads it: null row levels filled from the model's own item
    levels when it has them (what it trained with), else from raw_item_feature's."""
    test = store.read_raw("test")
    if not any(test.get_column(c).null_count() for c in LEVELS if c in test.columns):
        return test
    levels = getattr(model, "item_levels", None)
    if levels is not None:
        return fill_row_levels(test, levels.cpu().numpy(), "raw_test")
    try:
        levels = stored_item_levels(store, model.n_items, max_level)
    except ValueError as e:
        raise ValueError(f"raw_test has null likes/views levels and no per-item levels to fill them from: {e} "
                         "Fill them in test.parquet, or supply item_feature.parquet with both levels for every "
                         "item.") from None
    return fill_row_levels(test, levels, "raw_test")
