"""Content invariants of the MicroLens tables as check outcomes, so the Dagster layer reports every
one of them as a blocking asset check instead of stopping at the first (rules: microlens.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from mmctr_assets.lib.data.microlens import (
    MAX_LEVEL,
    ORGANISER_ITEM_EMB_COLUMNS,
    ORGANISER_ITEM_EMB_DIM,
    PRECOMPUTED_VECTORS,
    label_problem,
    level_range,
    not_left_padded,
)


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
    null_rows = _rows_with_null_entries(seq)
    if len(null_rows):
        return CheckOutcome(
            name,
            False,
            f"{table}.item_seq: {len(null_rows):,} histories hold null entries inside their lists "
            f"(first rows: {null_rows[:5].tolist()}). Padding is 0, never null: replace the nulls "
            "with 0 on the left (fill_null(0) on the list elements) or drop those rows.",
            {"rows_with_null_entries": int(len(null_rows)), "first_bad_rows": null_rows[:5].tolist()},
        )
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
        bad_rows.append(np.flatnonzero(not_left_padded(m)) + start)
        empty += int((~(m != 0).any(axis=1)).sum())
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


def _rows_with_null_entries(seq: pl.Series, rows: int = 1 << 18) -> np.ndarray:
    """Rows whose list holds a null element (row blocks: no copy of the whole column)."""
    out = []
    for start in range(0, len(seq), rows):
        block = seq.slice(start, rows)
        bad = (block.list.drop_nulls().list.len() != block.list.len()).fill_null(False)
        out.append(bad.arg_true().to_numpy().astype(np.int64) + start)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def check_has_rows(frame: pl.DataFrame, table: str) -> CheckOutcome:
    """An empty interaction table has the right schema and nothing in it: nothing downstream can
    use it (no training rows, no AUC, nothing to predict), so it blocks here with its name."""
    name = "has_rows"
    if frame.height == 0:
        use = {"train": "the model has nothing to learn from",
               "valid": "the model cannot be selected (validation AUC needs rows)",
               "test": "there is nothing to predict or submit"}.get(table, "nothing downstream can use it")
        return CheckOutcome(name, False, f"{table}.parquet has 0 rows: {use}. The file has the right "
                            "columns but no data; point MMCTR_DATA_DIR at the complete dataset or "
                            "re-export the table.", {"rows": 0})
    return CheckOutcome(name, True, f"{table}.parquet has {frame.height:,} rows.", {"rows": frame.height})


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
        # the offending id of each bad history: its negative minimum, else its too-large maximum
        hist_bad_id = pl.select(pl.when(hist_min < 0).then(hist_min).otherwise(hist_max)).to_series()
        example = (
            target.filter(bad_target).head(3).to_list()
            if n_bad_t
            else hist_bad_id.filter(bad_hist).head(3).to_list()
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
    problem = label_problem(table, label)
    if problem:
        bad = (~label.cast(pl.Float64).is_in([0.0, 1.0])).fill_null(True)
        return CheckOutcome(name, False, problem,
                            {"bad_rows": int(bad.sum()), "first_bad_rows": bad.arg_true().head(5).to_list()})
    rate = float(label.mean() or 0.0) if len(label) else 0.0
    return CheckOutcome(name, True, f"{table}.label is binary; positive rate {rate:.4f}.",
                        {"positive_rate": rate})


def check_levels(frame: pl.DataFrame, table: str, max_level: int, fill_from_items: bool = False) -> CheckOutcome:
    """Row levels, and item_feature's per-item levels when the file has them (the real download
    does, for every item): integers in 0..max_level, no nulls, in both places. ``fill_from_items``
    (a train/valid/test table while item_feature has per-item levels): a null row level passes, the
    model's inputs fill it with its target item's level (lib/ctr/inputs.py)."""
    name = "levels_in_range"
    lo, hi = level_range(max_level)
    present = [c for c in ("likes_level", "views_level") if c in frame.columns]
    if not present:
        return CheckOutcome(name, True, f"{table}: no likes_level/views_level columns (optional here).")
    problems, nulls, outside, filled = {}, {}, {}, {}
    for col in present:
        s = frame.get_column(col)
        n_null, n_out = s.null_count(), int(((s < lo) | (s > hi)).sum())
        if n_null and fill_from_items:
            filled[col], n_null = n_null, 0
        if n_null:
            nulls[col] = n_null
        if n_out:
            outside[col] = n_out
        if n_null or n_out:
            problems[col] = n_null + n_out
    if problems:
        said = []
        if nulls:  # a missing value is not a bigger bucket: no MMCTR_MAX_LEVEL hint for it
            said.append(f"null (missing) levels in {nulls}: every row needs a likes_level and views_level; fill "
                        f"them in the source table (a bucket {lo}..{hi}) or drop those rows.")
        if outside:
            said.append(f"values outside {lo}..{hi} in {outside}. likes_level/views_level are bucketed levels; set "
                        "MMCTR_MAX_LEVEL (and the model's level_vocab_size) if your data uses more buckets.")
        return CheckOutcome(name, False, f"{table}: " + " ".join(said), problems)
    if filled:
        return CheckOutcome(name, True, f"{table}: likes/views levels within {lo}..{hi}; null levels {filled} are "
                            "filled with the target item's level from item_feature.", {"filled_from_items": filled})
    return CheckOutcome(name, True, f"{table}: likes/views levels within {lo}..{hi}.")


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
    out.append(check_organisers_embedding(frame))
    return out


def check_organisers_embedding(frame: pl.DataFrame) -> CheckOutcome:
    """NaN/inf in item_emb_d128. A warning, not blocking: only ``embedding_source: organisers``
    (an ablation) reads this column, and dcn_din_model refuses a non-finite table itself; the
    default path (fused) replaces the column, so bad values here must not stop the graph."""
    name = "item_emb_d128_finite"
    emb = frame.get_column("item_emb_d128")
    bad = emb.list.eval((~pl.element().is_finite()).fill_null(True)).list.any().fill_null(True)
    rows = bad.arg_true().to_numpy()
    if len(rows):
        return CheckOutcome(
            name, False,
            f"item_info.item_emb_d128: {len(rows):,} items hold NaN, inf or null values (first item ids: "
            f"{rows[:5].tolist()}). A warning only: the default item table (fused) does not read this "
            "column, but dcn_din_model with embedding_source: organisers will refuse it. Fix the "
            "organisers' embedding (re-download item_info) before using that source.",
            {"bad_items": int(len(rows)), "first_bad_items": rows[:5].tolist()},
        )
    return CheckOutcome(name, True, "item_info.item_emb_d128: every value finite.")


def _bad_vector_rows(column: pl.Series, dim: int) -> np.ndarray:
    """Rows whose vector is null, not ``dim`` long, or holds a null, NaN or inf."""
    wrong_length = column.list.len().fill_null(-1) != dim
    not_finite = column.list.eval((~pl.element().is_finite()).fill_null(True)).list.any().fill_null(True)
    return (wrong_length | not_finite).arg_true().to_numpy()


def check_vectors(frame: pl.DataFrame, table: str, dims: dict[str, int], name: str) -> CheckOutcome:
    """Each vector column present: every row ``dims[col]`` long and finite."""
    present = {c: d for c, d in dims.items() if c in frame.columns}
    if not present:
        return CheckOutcome(name, True, f"{table}: no precomputed vector columns ({', '.join(dims)}): optional.")
    problems = {}
    for col, dim in present.items():
        rows = _bad_vector_rows(frame.get_column(col), dim)
        if len(rows):
            ids = frame.get_column("item_id").gather(rows[:5]).to_list()
            problems[col] = {"bad_items": int(len(rows)), "expected_length": dim, "first_bad_item_ids": ids}
    if problems:
        return CheckOutcome(
            name, False,
            f"{table}: vectors of the wrong length or with null/NaN/inf values: {problems}. Re-download "
            f"{table}.parquet, or drop the broken column to go without it.", problems)
    return CheckOutcome(name, True, f"{table}: {', '.join(f'{c} ({d}-d)' for c, d in present.items())}: "
                        "every vector full length and finite.", {"columns": list(present)})


def check_item_emb_ids(frame: pl.DataFrame, n_items: int) -> CheckOutcome:
    """item_emb.parquet must give every item of item_info 1..N exactly one row (row 0, the
    padding item, may be there too); a model reads it as an [N + 1, 128] table by item_id."""
    name = "item_ids_match_item_info"
    ids = frame.get_column("item_id")
    outside = ids.filter((ids < 0) | (ids > n_items) | ids.is_null())
    dups = ids.filter(ids.is_duplicated()).unique().sort()
    missing = pl.Series(np.setdiff1d(np.arange(1, n_items + 1), ids.drop_nulls().to_numpy()))
    if len(outside) or len(dups) or len(missing):
        return CheckOutcome(
            name, False,
            f"item_emb.parquet, column item_id: {len(outside)} ids outside item_info 0..{n_items} (e.g. "
            f"{outside.head(3).to_list()}), {len(dups)} repeated (e.g. {dups.head(3).to_list()}), "
            f"{len(missing)} items of item_info without a row (e.g. {missing.head(3).to_list()}). Use the "
            "item_emb.parquet of this dataset (one row per item), or remove it to go without.",
            {"outside": len(outside), "duplicated": len(dups), "missing": len(missing)})
    return CheckOutcome(name, True, f"item_emb: one row for each of the {n_items} items.", {"n_items": n_items})


def content_checks(table: str, frame: pl.DataFrame, n_items: int | None,
                   max_level: int = MAX_LEVEL, items_have_levels: bool = False) -> list[CheckOutcome]:
    """Every content invariant the downstream assets rely on, for one table. ``items_have_levels``:
    item_feature carries per-item levels, which fill a row's null levels (check_levels)."""
    if table == "item_info":
        return check_item_info(frame)
    if table == "item_emb":
        return [check_item_emb_ids(frame, n_items or 0),
                check_vectors(frame, "item_emb", dict.fromkeys(ORGANISER_ITEM_EMB_COLUMNS, ORGANISER_ITEM_EMB_DIM),
                              "vectors_well_formed")]
    if table == "item_feature":
        ids = frame.get_column("item_id")
        bad = int(((ids < 1) | (ids > (n_items or 0))).sum())
        return [
            CheckOutcome(
                "item_ids_in_item_info",
                bad == 0,
                f"item_feature: {bad} item ids outside item_info 1..{n_items}.",
                {"bad": bad},
            ),
            check_item_feature_unique(ids),
            check_levels(frame, table, max_level),
            check_vectors(frame, table, PRECOMPUTED_VECTORS, "precomputed_vectors_well_formed"),
        ]
    out = [check_has_rows(frame, table), check_histories(frame, table)]
    if n_items is not None:
        out.append(check_item_ids(frame, table, n_items))
    out.append(check_levels(frame, table, max_level, fill_from_items=items_have_levels))
    if table == "test":
        out.append(check_test_ids(frame))
    else:
        out.append(check_labels(frame, table))
    if table == "valid":
        out.append(check_both_classes(frame))
    return out


def check_item_feature_unique(ids: pl.Series) -> CheckOutcome:
    """One title/tag row per item: with two, which one CLIP embeds would depend on row order."""
    name = "item_ids_unique"
    dups = ids.filter(ids.is_duplicated()).unique().sort()
    if len(dups):
        return CheckOutcome(
            name, False,
            f"item_feature.parquet, column item_id: {len(dups)} item ids appear on more than one row "
            f"(examples {dups.head(5).to_list()}). Keep one row per item (e.g. "
            "pl.read_parquet(path).unique('item_id', keep='last')), then materialise raw_item_feature again.",
            {"duplicated_ids": len(dups)})
    return CheckOutcome(name, True, f"item_feature: {len(ids)} rows, one per item_id.")


def check_both_classes(frame: pl.DataFrame) -> CheckOutcome:
    """Validation AUC (early stopping, the LR schedule, the champion gate) is undefined on one class."""
    name = "valid_has_both_classes"
    label = frame.get_column("label").cast(pl.Float64)
    positives, rows = int((label == 1.0).sum()), len(label)
    if rows and 0 < positives < rows:
        return CheckOutcome(name, True, f"valid: {positives} clicks and {rows - positives} non-clicks.")
    only = "1 (clicks)" if positives else "0 (non-clicks)"
    return CheckOutcome(
        name, False,
        f"valid.parquet, column label: all {rows} labels are {only}. AUC is undefined on one class, so "
        "nothing can be validated on it (early stopping, the champion gate). Provide a valid table with "
        "both clicks and non-clicks, then materialise raw_valid again.",
        {"positives": positives, "rows": rows})


CHECK_NAMES: dict[str, list[str]] = {
    "train": ["has_rows", "history_fixed_length_left_padded", "item_ids_in_item_info", "levels_in_range",
              "labels_binary"],
    "valid": ["has_rows", "history_fixed_length_left_padded", "item_ids_in_item_info", "levels_in_range",
              "labels_binary", "valid_has_both_classes"],
    "test": ["has_rows", "history_fixed_length_left_padded", "item_ids_in_item_info", "levels_in_range",
             "test_ids_unique"],
    "item_info": ["row_index_is_item_id", "padding_row_and_shapes", "item_emb_d128_finite"],
    "item_feature": ["item_ids_in_item_info", "item_ids_unique", "levels_in_range",
                     "precomputed_vectors_well_formed"],
    "item_emb": ["item_ids_match_item_info", "vectors_well_formed"],
}
# checks that warn instead of blocking (the reason is in each check's docstring and description):
# only an opt-in source reads these vectors (embedding_source organisers; clip_embeddings source
# precomputed), and each refuses non-finite values itself, so the default path must not stop
WARNING_CHECKS = frozenset({"item_emb_d128_finite", "precomputed_vectors_well_formed"})


def history_length_summary(frame: pl.DataFrame) -> dict[str, float]:
    """Distribution of real (non-padding) history lengths."""
    seq = frame.get_column("item_seq")
    if len(seq) == 0:
        return {}
    # row blocks: count_matches over the whole column materialises a copy of it
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


