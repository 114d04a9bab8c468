"""The MicroLens-format data layer: table specs, columnar reading, validation and fingerprints.

Validation is split in two on purpose. Structural problems (missing file, missing column, wrong
dtype) make a table unreadable and raise `DataValidationError` at once. Content invariants
(fixed-length left-padded histories, ids inside item_info, binary labels, unique test IDs...) are
returned as `CheckOutcome`s so the Dagster layer can report every one of them as a blocking asset
check instead of stopping at the first.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

DATASET_DIR = "MicroLens_1M_x1"
GET_DATA_HINT = (
    "Point MMCTR_DATA_DIR at the folder that holds MicroLens_1M_x1/, item_feature.parquet and "
    "item_images/ (the WWW 2025 MM-CTR challenge download), or generate the demo dataset with "
    "`mmctr-demo-data --out <dir> --size small` (or `make demo`)."
)
EXPECTED_LAYOUT = (
    "<data_dir>/MicroLens_1M_x1/{train,valid,test,item_info}.parquet, "
    "<data_dir>/item_feature.parquet (optional), <data_dir>/item_images/<item_id>.jpg"
)


class DataValidationError(ValueError):
    """Input data that cannot be used as it is; the message says what, where and what to do."""


# Dtype families: the challenge files use int64/float everywhere, but a re-export with int32
# levels or a float32 label is still the same data, so families are accepted and normalised.
INT = "integer"
FLOAT_OR_INT = "number"
INT_LIST = "list of integers"
FLOAT_LIST = "list of floats"
STRING = "string"


@dataclass(frozen=True)
class TableSpec:
    name: str
    relpath: str
    columns: dict[str, str]
    optional: bool = False
    # dtypes the normalised snapshot is cast to
    casts: dict[str, pl.DataType] = field(default_factory=dict)


_INTERACTION = {
    "user_id": INT,
    "item_seq": INT_LIST,
    "item_id": INT,
    "likes_level": INT,
    "views_level": INT,
}
_INTERACTION_CASTS = {
    "user_id": pl.Int64,
    "item_seq": pl.List(pl.Int64),
    "item_id": pl.Int64,
    "likes_level": pl.Int64,
    "views_level": pl.Int64,
}

TABLES: dict[str, TableSpec] = {
    "train": TableSpec(
        "train",
        f"{DATASET_DIR}/train.parquet",
        {**_INTERACTION, "label": FLOAT_OR_INT},
        casts={**_INTERACTION_CASTS, "label": pl.Float32},
    ),
    "valid": TableSpec(
        "valid",
        f"{DATASET_DIR}/valid.parquet",
        {**_INTERACTION, "label": FLOAT_OR_INT},
        casts={**_INTERACTION_CASTS, "label": pl.Float32},
    ),
    "test": TableSpec(
        "test",
        f"{DATASET_DIR}/test.parquet",
        {"ID": INT, **_INTERACTION},
        casts={"ID": pl.Int64, **_INTERACTION_CASTS},
    ),
    "item_info": TableSpec(
        "item_info",
        f"{DATASET_DIR}/item_info.parquet",
        {"item_id": INT, "item_tags": INT_LIST, "item_emb_d128": FLOAT_LIST},
        casts={"item_id": pl.Int64, "item_tags": pl.List(pl.Int64)},
    ),
    "item_feature": TableSpec(
        "item_feature",
        "item_feature.parquet",
        {"item_id": INT, "item_title": STRING, "item_tags": INT_LIST},
        optional=True,
        casts={"item_id": pl.Int64, "item_tags": pl.List(pl.Int64)},
    ),
}

IMAGES_DIR = "item_images"


def _family(t: pa.DataType) -> set[str]:
    if pa.types.is_integer(t):
        return {INT, FLOAT_OR_INT}
    if pa.types.is_floating(t):
        return {FLOAT_OR_INT}
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return {STRING}
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        v = t.value_type
        if pa.types.is_integer(v):
            return {INT_LIST}
        if pa.types.is_floating(v):
            return {FLOAT_LIST}
    return set()


def table_path(data_dir: str | os.PathLike, table: str) -> Path:
    return Path(data_dir) / TABLES[table].relpath


def require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DataValidationError(
            f"{what}: file not found: {path}\nExpected layout: {EXPECTED_LAYOUT}\n{GET_DATA_HINT}"
        )


def check_schema(table: str, schema: pa.Schema, path: Path) -> None:
    """Raise DataValidationError listing every missing column and wrong dtype at once."""
    spec = TABLES[table]
    problems = []
    for col, family in spec.columns.items():
        if col not in schema.names:
            problems.append(f"missing column {col!r} (expected {family})")
        elif family not in _family(schema.field(col).type):
            problems.append(f"column {col!r} has dtype {schema.field(col).type}, expected {family}")
    if problems:
        raise DataValidationError(
            f"{table} table at {path} does not match the MicroLens format:\n  - "
            + "\n  - ".join(problems)
            + f"\nFound columns: {', '.join(f'{n}: {t}' for n, t in zip(schema.names, schema.types))}."
            "\nFix the file (or re-export it) so it has the columns listed in README.md (Data format)."
        )


def read_table(data_dir: str | os.PathLike, table: str) -> pl.DataFrame:
    """Read one source table (only the spec's columns), after checking its file and schema."""
    spec = TABLES[table]
    path = table_path(data_dir, table)
    require_file(path, f"{table} table")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataValidationError(
            f"{table} table at {path} is not a readable parquet file ({exc}). Re-download or "
            "regenerate it."
        ) from exc
    check_schema(table, schema, path)
    frame = pl.read_parquet(path, columns=list(spec.columns))
    casts = {c: t for c, t in spec.casts.items() if frame.schema[c] != t}
    return frame.cast(casts) if casts else frame


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Content hash (blake2b-128) of a file: changes exactly when the bytes change."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# content checks


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    description: str
    details: dict = field(default_factory=dict)


def history_blocks(seq: pl.Series, width: int, rows: int = 1 << 18):
    """Yield (offset, [rows, width] int64 matrix) blocks of a fixed-length history column.

    Blocks keep peak memory flat: a full-size train table is 3.6M x 100 ids (2.9 GB).
    """
    for start in range(0, len(seq), rows):
        block = seq.slice(start, rows)
        yield start, block.list.to_array(width).to_numpy().reshape(len(block), width)


def check_histories(frame: pl.DataFrame, table: str) -> CheckOutcome:
    """Histories must be fixed-length lists, left-padded with 0 (no real item before a 0)."""
    name = "history_fixed_length_left_padded"
    seq = frame.get_column("item_seq")
    lengths = seq.list.len()
    if seq.null_count() or (len(lengths) and lengths.min() != lengths.max()):
        counts = lengths.value_counts(sort=True).head(5)
        bad_row = int((lengths != lengths.mode().first()).arg_true().first() or 0)
        return CheckOutcome(
            name,
            False,
            f"{table}.item_seq is not a fixed-length list: lengths seen "
            f"{dict(zip(counts[:, 0].to_list(), counts[:, 1].to_list()))} (null rows: "
            f"{seq.null_count()}); first odd row: {bad_row}. Every history must be padded on the "
            "left with 0 to the same length.",
            {"first_bad_row": bad_row, "null_rows": seq.null_count()},
        )
    width = int(lengths.max()) if len(lengths) else 0
    bad_rows: list[np.ndarray] = []
    empty = 0
    for start, m in history_blocks(seq, width):
        real = m != 0
        # left padding <=> once a real item appears, every later position is real
        bad = (real[:, :-1] & ~real[:, 1:]).any(axis=1) | (m < 0).any(axis=1)
        bad_rows.append(np.flatnonzero(bad) + start)
        empty += int((~real.any(axis=1)).sum())
    rows = np.concatenate(bad_rows) if bad_rows else np.zeros(0, np.int64)
    if len(rows):
        return CheckOutcome(
            name,
            False,
            f"{table}.item_seq: {len(rows)} rows are not left-padded with 0 or hold negative ids "
            f"(first rows: {rows[:5].tolist()}). Real items must be right-aligned, padding 0 on the left.",
            {"bad_rows": int(len(rows)), "first_bad_rows": rows[:5].tolist()},
        )
    return CheckOutcome(
        name,
        True,
        f"{table}.item_seq: {len(seq)} histories of fixed length {width}, left-padded.",
        {"seq_len": width, "empty_histories": empty},
    )


def check_item_ids(frame: pl.DataFrame, table: str, n_items: int) -> CheckOutcome:
    """Every target and history id must be a row of item_info (0 = padding, only in histories)."""
    name = "item_ids_in_item_info"
    target = frame.get_column("item_id")
    bad_target = (target < 1) | (target > n_items) | target.is_null()
    seq = frame.get_column("item_seq")
    hist_max = seq.list.max().fill_null(0)
    hist_min = seq.list.min().fill_null(0)
    bad_hist = (hist_max > n_items) | (hist_min < 0)
    n_bad_t, n_bad_h = int(bad_target.sum()), int(bad_hist.sum())
    if n_bad_t or n_bad_h:
        example = (
            target.filter(bad_target).head(3).to_list()
            if n_bad_t
            else hist_max.filter(bad_hist).head(3).to_list()
        )
        return CheckOutcome(
            name,
            False,
            f"{table}: {n_bad_t} target item_id values and {n_bad_h} histories reference items "
            f"outside item_info (valid ids 1..{n_items}; examples: {example}). Use the item_info "
            "that belongs to this dataset, or drop those rows.",
            {"bad_targets": n_bad_t, "bad_histories": n_bad_h, "n_items": n_items},
        )
    return CheckOutcome(name, True, f"{table}: all item ids within 1..{n_items}.", {"n_items": n_items})


def check_labels(frame: pl.DataFrame, table: str) -> CheckOutcome:
    name = "labels_binary"
    label = frame.get_column("label")
    bad = ~label.is_in([0.0, 1.0]).fill_null(False) | label.is_nan().fill_null(True)
    n_bad = int(bad.sum())
    if n_bad:
        rows = bad.arg_true().head(5).to_list()
        values = label.filter(bad).unique().head(5).to_list()
        return CheckOutcome(
            name,
            False,
            f"{table}.label: {n_bad} values are not 0 or 1 (examples {values} at rows {rows}). "
            "Labels must be clicks: 0.0 or 1.0, no nulls/NaN.",
            {"bad_rows": n_bad},
        )
    return CheckOutcome(
        name, True, f"{table}.label is binary; positive rate {label.mean():.4f}.",
        {"positive_rate": float(label.mean() or 0.0)},
    )


def check_levels(frame: pl.DataFrame, table: str) -> CheckOutcome:
    name = "levels_in_range"
    problems = {}
    for col in ("likes_level", "views_level"):
        s = frame.get_column(col)
        n_bad = int(((s < 0) | (s > 10) | s.is_null()).sum())
        if n_bad:
            problems[col] = n_bad
    if problems:
        return CheckOutcome(
            name, False,
            f"{table}: values outside 0..10 (or null) in {problems}. likes_level/views_level are "
            "bucketed levels 1..10.",
            problems,
        )
    return CheckOutcome(name, True, f"{table}: likes/views levels within 0..10.")


def check_test_ids(frame: pl.DataFrame) -> CheckOutcome:
    name = "test_ids_unique"
    ids = frame.get_column("ID")
    n_null = ids.null_count()
    n_dup = len(ids) - ids.n_unique() - (1 if n_null > 1 else 0)
    if n_null or n_dup:
        dups = ids.filter(ids.is_duplicated()).unique().head(5).to_list()
        return CheckOutcome(
            name,
            False,
            f"test.ID: {n_null} missing and {n_dup} duplicated IDs (examples {dups}). Every test row "
            "needs its own ID: the submission is scored by ID.",
            {"missing": n_null, "duplicated": n_dup},
        )
    return CheckOutcome(name, True, f"test.ID: {len(ids)} unique IDs.")


def check_item_info(frame: pl.DataFrame) -> list[CheckOutcome]:
    ids = frame.get_column("item_id").to_numpy()
    out = []
    ok = np.array_equal(ids, np.arange(len(ids)))
    first_bad = int(np.flatnonzero(ids != np.arange(len(ids)))[0]) if not ok else None
    out.append(
        CheckOutcome(
            "row_index_is_item_id",
            ok,
            "item_info rows are item 0..N in order (row 0 = padding)."
            if ok
            else f"item_info.item_id must equal the row index 0..N (row 0 = padding item); first "
            f"mismatch at row {first_bad} (item_id {ids[first_bad]}). Sort by item_id and make sure "
            "no id is missing or repeated.",
            {"n_rows": len(ids)},
        )
    )
    emb_len = frame.get_column("item_emb_d128").list.len()
    tag_len = frame.get_column("item_tags").list.len()
    pad_zero = len(frame) > 0 and all(
        frame.get_column(c).head(1).list.eval(pl.element().abs()).list.sum().fill_null(0).item() == 0
        for c in ("item_emb_d128", "item_tags")
    )
    shapes_ok = len(frame) > 0 and emb_len.min() == emb_len.max() == 128 and tag_len.min() == tag_len.max()
    out.append(
        CheckOutcome(
            "padding_row_and_shapes",
            bool(shapes_ok and pad_zero),
            f"item_info: item_emb_d128 lengths {emb_len.min()}..{emb_len.max()} (expected 128), "
            f"item_tags lengths {tag_len.min()}..{tag_len.max()} (expected one fixed length), "
            f"padding row 0 all zero: {pad_zero}.",
        )
    )
    return out


def content_checks(table: str, frame: pl.DataFrame, n_items: int | None) -> list[CheckOutcome]:
    """Every content invariant the downstream assets rely on, for one table."""
    if table == "item_info":
        return check_item_info(frame)
    if table == "item_feature":
        ids = frame.get_column("item_id")
        bad = int(((ids < 1) | (ids > (n_items or 0))).sum())
        return [
            CheckOutcome(
                "item_ids_in_item_info",
                bad == 0,
                f"item_feature: {bad} item ids outside item_info 1..{n_items}.",
                {"bad": bad},
            )
        ]
    out = [check_histories(frame, table)]
    if n_items is not None:
        out.append(check_item_ids(frame, table, n_items))
    out.append(check_levels(frame, table))
    if table == "test":
        out.append(check_test_ids(frame))
    else:
        out.append(check_labels(frame, table))
    return out


CHECK_NAMES: dict[str, list[str]] = {
    "train": ["history_fixed_length_left_padded", "item_ids_in_item_info", "levels_in_range", "labels_binary"],
    "valid": ["history_fixed_length_left_padded", "item_ids_in_item_info", "levels_in_range", "labels_binary"],
    "test": ["history_fixed_length_left_padded", "item_ids_in_item_info", "levels_in_range", "test_ids_unique"],
    "item_info": ["row_index_is_item_id", "padding_row_and_shapes"],
    "item_feature": ["item_ids_in_item_info"],
}


def history_length_summary(frame: pl.DataFrame) -> dict[str, float]:
    """Distribution of real (non-padding) history lengths."""
    seq = frame.get_column("item_seq")
    if len(seq) == 0:
        return {}
    # row blocks: count_matches over the whole column materialises a copy of it (2.8 GB at full size)
    zeros = pl.concat([seq.slice(s, 1 << 18).list.count_matches(0) for s in range(0, len(seq), 1 << 18)])
    lengths = seq.list.len() - zeros
    q = lengths.cast(pl.Float64)
    return {
        "min": float(q.min()),
        "median": float(q.median()),
        "mean": round(float(q.mean()), 3),
        "p95": float(q.quantile(0.95)),
        "max": float(q.max()),
        "padding_share": round(1 - float(q.sum()) / (len(q) * seq.list.len().max()), 4),
    }


# ----------------------------------------------------------------------------------------------
# images


def image_manifest(data_dir: str | os.PathLike, item_ids: np.ndarray, workers: int = 8) -> pl.DataFrame:
    """One row per item: its cover path, whether the file exists and whether it decodes."""
    from PIL import Image

    root = Path(data_dir) / IMAGES_DIR
    paths = [str(root / f"{i}.jpg") for i in item_ids.tolist()]

    def probe(p: str) -> tuple[bool, bool]:
        if not os.path.isfile(p):
            return False, False
        try:
            with Image.open(p) as im:
                im.load()
            return True, True
        except Exception:  # PIL raises a zoo of errors for broken files; all mean "not decodable"
            return True, False

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(probe, paths, chunksize=256))
    exists, decodable = zip(*results) if results else ((), ())
    return pl.DataFrame(
        {
            "item_id": pl.Series(item_ids, dtype=pl.Int64),
            "image_path": paths,
            "exists": pl.Series(exists, dtype=pl.Boolean),
            "decodable": pl.Series(decodable, dtype=pl.Boolean),
        }
    )


def item_content_frame(item_info: pl.DataFrame, item_feature: pl.DataFrame, images: pl.DataFrame) -> pl.DataFrame:
    """What the content encoder sees per real item: title, tags and cover path.

    Tags come from item_feature's full list when the item has one, else from item_info's five;
    items absent from item_feature get a null title (their text is their tags).
    """
    feature = item_feature.select(
        "item_id", pl.col("item_title").alias("title"), pl.col("item_tags").alias("feature_tags")
    )
    return (
        item_info.filter(pl.col("item_id") > 0)
        .select("item_id", "item_tags")
        .join(feature, on="item_id", how="left")
        .join(images.select("item_id", "image_path"), on="item_id", how="left")
        .select(
            "item_id",
            "title",
            pl.coalesce("feature_tags", "item_tags").alias("tags"),
            "image_path",
        )
    )
