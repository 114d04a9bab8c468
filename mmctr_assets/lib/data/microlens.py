"""The MicroLens format: where each file lives, what each table holds, and the invariants of its
values, owned here once and applied both by the raw asset checks (lib/data/checks.py) and by the
conversion of tables to model tensors (lib/ctr/tensors.py).

Structural problems (missing file, missing column, wrong dtype) make a table unreadable and raise
`DataValidationError` at once; content invariants are reported by lib/data/checks.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

DATASET_DIR = "MicroLens_1M_x1"
IMAGES_DIR = "item_images"
GROUND_TRUTH_DIR = "ground_truth"  # demo data only: the generator's true click probabilities
GET_DATA_HINT = (
    "Point MMCTR_DATA_DIR at the folder that holds MicroLens_1M_x1/, item_feature.parquet and "
    "item_images/ (the WWW 2025 MM-CTR challenge download), or generate the demo dataset with "
    "`mmctr-demo-data --out <dir> --size small` (or `make demo`)."
)
EXPECTED_LAYOUT = (
    "<data_dir>/MicroLens_1M_x1/{train,valid,test,item_info}.parquet, "
    "<data_dir>/item_feature.parquet (optional), <data_dir>/item_emb.parquet (optional), "
    "<data_dir>/item_images/<item_id>.jpg"
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
    # columns some downloads carry and others lack: checked and kept when present (casts apply)
    optional_columns: dict[str, str] = field(default_factory=dict)


# the real download's precomputed item vectors and their lengths (item_feature; item_emb.parquet)
PRECOMPUTED_VECTORS = {"txt_emb_BERT": 768, "img_emb_CLIPRN50": 1024}
ORGANISER_ITEM_EMB_COLUMNS = ("item_emb_d128_v1", "item_emb_d128_v2", "item_emb_d128_v3", "item_emb_d128_e4")
ORGANISER_ITEM_EMB_DIM = 128

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
        casts={"item_id": pl.Int64, "item_title": pl.String, "item_tags": pl.List(pl.Int64),
               "likes_level": pl.Int64, "views_level": pl.Int64,
               "txt_emb_BERT": pl.List(pl.Float32), "img_emb_CLIPRN50": pl.List(pl.Float32)},
        optional_columns={"likes_level": INT, "views_level": INT,
                          "txt_emb_BERT": FLOAT_LIST, "img_emb_CLIPRN50": FLOAT_LIST},
    ),
    "item_emb": TableSpec(
        "item_emb",
        "item_emb.parquet",
        {"item_id": INT, **{c: FLOAT_LIST for c in ORGANISER_ITEM_EMB_COLUMNS}},
        optional=True,
        casts={"item_id": pl.Int64} | {c: pl.List(pl.Float32) for c in ORGANISER_ITEM_EMB_COLUMNS},
    ),
}

LABEL_VALUES = (0.0, 1.0)
MAX_LEVEL = 10  # likes_level / views_level are bucketed 1..10 in the challenge data (0 allowed)
PADDING_ID = 0  # in item_seq, item_info row 0 and item tags: never a real item


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
    for col, family in (spec.columns | spec.optional_columns).items():
        if col not in schema.names:
            if col in spec.columns:
                problems.append(f"missing column {col!r} (expected {family})")
        elif family not in _family(schema.field(col).type):
            problems.append(f"column {col!r} has dtype {schema.field(col).type}, expected {family}")
    if problems:
        raise DataValidationError(
            f"{table} table at {path} does not match the MicroLens format:\n  - "
            + "\n  - ".join(problems)
            + f"\nFound columns: {', '.join(f'{n}: {t}' for n, t in zip(schema.names, schema.types))}."
            "\nFix the file (or re-export it) so it has the columns listed in docs/data.md (Data format)."
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
    columns = present_columns(table, schema.names)
    try:
        frame = pl.read_parquet(path, columns=columns)
    except pl.exceptions.PolarsError as exc:
        raise _unreadable_column_error(table, path, exc, columns) from exc
    casts = {c: t for c, t in spec.casts.items() if c in frame.columns and frame.schema[c] != t}
    return frame.cast(casts) if casts else frame


def present_columns(table: str, names: list[str]) -> list[str]:
    """The table's columns a file holds: every required one, then the optional ones it has."""
    spec = TABLES[table]
    return list(spec.columns) + [c for c in spec.optional_columns if c in names]


def _unreadable_column_error(table: str, path: Path, exc: Exception, columns: list[str]) -> DataValidationError:
    """Name the column polars could not decode (it says neither file nor column), and the fix."""
    bad = []
    for col in columns:  # column by column: only on the error path
        try:
            pl.read_parquet(path, columns=[col])
        except pl.exceptions.PolarsError:
            bad.append(col)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    utf8 = "utf-8" in str(exc).lower() or "utf8" in str(exc).lower()
    what = (f"column {', '.join(map(repr, bad))}" if bad else f"one of the columns {columns}")
    fix = ("Text columns must be valid UTF-8: re-export the file with the text decoded and re-encoded "
           "as UTF-8 (e.g. bytes.decode('utf-8', errors='replace') or the source's real encoding), "
           "or drop the rows whose text is broken."
           if utf8 else "Re-export or regenerate the file.")
    return DataValidationError(f"{table} table at {path}: {what} cannot be decoded ({first}). {fix}")


def ignored_columns(data_dir: str | os.PathLike, table: str) -> list[str]:
    """Columns of a source file that the format does not use (read_table leaves them out)."""
    path = table_path(data_dir, table)
    spec = TABLES[table]
    return [c for c in pq.read_schema(path).names if c not in spec.columns and c not in spec.optional_columns]


def empty_table(table: str) -> pl.DataFrame:
    """An absent optional table's snapshot: its required columns, no rows."""
    spec = TABLES[table]
    return pl.DataFrame(schema={c: spec.casts.get(c, pl.String) for c in spec.columns})



# ----------------------------------------------------------------------------------------------
# value invariants (one owner: the raw checks and the tensor conversion both call these)


def bad_label_rows(label: np.ndarray) -> np.ndarray:
    """Row numbers whose label is not 0 or 1 (NaN and inf included)."""
    label = np.asarray(label, dtype=np.float64)
    return np.flatnonzero(~np.isin(label, LABEL_VALUES))


def describe_bad_labels(table: str, label: np.ndarray, rows: np.ndarray,
                        null_rows: np.ndarray | None = None) -> str:
    """One message for both callers; example values printed beside their own row numbers
    (``null_rows``: rows that were null before conversion to float, shown as null, not nan)."""
    nulls = set() if null_rows is None else set(np.asarray(null_rows).tolist())
    examples = ", ".join(f"row {int(r)}: {'null' if int(r) in nulls else label[r]}" for r in rows[:5])
    return (f"{table}.label: {len(rows):,} values are not 0 or 1 ({examples}). Labels must be "
            "clicks: 0.0 or 1.0, no nulls/NaN; binarise them or drop those rows.")


def label_problem(table: str, label: pl.Series) -> str | None:
    """None when every label is 0 or 1, else the message (nulls, NaN, inf and other values, each
    example beside its own row number). The raw check and the tensor conversion both call this."""
    values = label.cast(pl.Float64).fill_null(float("nan")).to_numpy()
    rows = bad_label_rows(values)
    if not len(rows):
        return None
    return describe_bad_labels(table, values, rows, label.is_null().arg_true().to_numpy())


def not_left_padded(history: np.ndarray) -> np.ndarray:
    """Per row of an ``[N, L]`` id matrix: True where a real item is followed by padding, or an
    id is negative. Left padding means: once a real item appears, every later position is real
    (the most recent item is last)."""
    real = history != PADDING_ID
    return (real[:, :-1] & ~real[:, 1:]).any(axis=1) | (history < 0).any(axis=1)


def level_range(max_level: int = MAX_LEVEL) -> tuple[int, int]:
    """Allowed likes/views levels; a model's level table needs ``max_level + 1`` rows."""
    return 0, max_level
