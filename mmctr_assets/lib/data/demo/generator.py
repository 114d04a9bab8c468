"""The demo generator's entry points: ``generate`` writes a whole dataset (tables, covers, ground
truth, manifest) atomically; ``main`` is the ``mmctr-demo-data`` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmctr_assets.lib.data.demo import covers
from mmctr_assets.lib.data.demo.config import (
    _PARQUET_OPTS,
    _STREAM_BROKEN,
    _STREAM_ROWS,
    EMB_DIM,
    HISTORY_INTEREST_SHARE,
    ITEM_EMB_SCHEMA,
    ITEM_FEATURE_SCHEMA,
    ITEM_INFO_SCHEMA,
    N_INFO_TAGS,
    RECENCY_DECAY,
    ROWS_SCHEMA,
    SIZES,
    TARGET_INTEREST_SHARE,
    TEST_SCHEMA,
    TOPIC_BIAS_SD,
    USER_BIAS_SD,
    V2_TARGET_INTEREST_SHARE,
    V2_TARGET_RECENT_SHARE,
    V2_TOPIC_STAY,
    V2_W_AFFINITY,
    V2_W_RECENT,
    V3_HEAVY_HISTORY_MEDIAN,
    V3_HEAVY_HISTORY_SIGMA,
    V3_HEAVY_USER_SHARE,
    V3_ITEM_APPEAL_SD,
    V3_POPULARITY_EXPONENT,
    W_AFFINITY,
    W_LIKES,
    W_POPULARITY,
    W_VIEWS,
    WORLDS,
    DemoSize,
    _list_array,
    _offsets,
    _positions,
    _rng,
    _sigmoid,
)
from mmctr_assets.lib.data.demo.items import (
    _item_emb_versions,
    _item_tags,
    _make_items,
    _organiser_embedding,
    _precomputed_vectors,
    _titles,
)
from mmctr_assets.lib.data.demo.rows import _make_rows, _Rows, _write_rows
from mmctr_assets.lib.data.microlens import DATASET_DIR, GROUND_TRUTH_DIR, IMAGES_DIR, TABLES
from mmctr_assets.lib.io import atomic_path

log = logging.getLogger("mmctr_assets.lib.data.demo")


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
    propensity; "v3" adds a per-item latent appeal no content shows, a long-tailed exposure and
    long histories for the most active users; "v1" is the earliest world. v1 and v2 are written
    byte for byte as before, so old figures stay comparable (v1's manifest has no "world" key,
    like every dataset written before v2 existed).
    The dataset is built in a temp folder beside ``root`` and renamed into place at the end, so
    an interrupted run leaves no half dataset and an overwritten one stays intact until then.
    """
    size = _resolve_size(size)
    if world not in WORLDS:
        raise ValueError(f"unknown demo world {world!r}; choose one of {list(WORLDS)} "
                         "(v2: recency + per-user click propensity, the default; v3: v2 + item appeal only ids "
                         "reveal, long-tailed exposure, long histories; v1: the earliest world)")
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
    items = _make_items(size, seed, world)
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
        vectors = lambda m: _list_array(m.ravel(), np.full(len(m), m.shape[1]))  # noqa: E731
        pq.write_table(pa.table({
            "item_id": item_ids[1:], "item_title": _titles(size, items, seed),
            "item_tags": _list_array(tags, n_tags),
            "likes_level": items.likes[1:], "views_level": items.views[1:],
        } | {c: vectors(m) for c, m in _precomputed_vectors(size, items, seed).items()},
            schema=ITEM_FEATURE_SCHEMA), tmp / TABLES["item_feature"].relpath, **_PARQUET_OPTS)
        pq.write_table(pa.table({"item_id": item_ids[1:]}
                                | {c: vectors(m) for c, m in _item_emb_versions(size, items, seed).items()},
                                schema=ITEM_EMB_SCHEMA), tmp / TABLES["item_emb"].relpath, **_PARQUET_OPTS)

        log.info("writing %d cover images", size.n_items - len(missing))
        covers._write_images(tmp / IMAGES_DIR, size, items, seed, missing, progress)
        covers._break_images(tmp / IMAGES_DIR, corrupt, seed)

        # v2 adds the click probability without the user term: the best a model can do
        # without learning each user's propensity (ranking-equivalent to E[p | all but the user]).
        no_user = {} if world == "v1" else {"click_prob_without_user_bias": _sigmoid(rows.logit_without_user)}
        if rows.logit_without_appeal is not None:  # v3: the best without learning each item's appeal
            no_user["click_prob_without_item_appeal"] = _sigmoid(rows.logit_without_appeal)
        pq.write_table(pa.table({"row": np.arange(n_va, dtype=np.int64), "click_prob": rows.click_prob[va:te]}
                                | {k: v[va:te] for k, v in no_user.items()}),
                       truth / "valid.parquet")
        pq.write_table(pa.table({"ID": test_ids, "click_prob": rows.click_prob[te:]}
                                | {k: v[te:] for k, v in no_user.items()} | {"label": rows.label[te:]}),
                       truth / "test.parquet")
        v3 = world == "v3"
        if rows.user_bias is not None:
            pq.write_table(pa.table({"user_id": np.arange(1, size.n_users + 1, dtype=np.int64),
                                     "click_bias": rows.user_bias}
                                    | ({"long_history": rows.heavy_user} if v3 else {})), truth / "users.parquet")
        pq.write_table(pa.table({"item_id": item_ids[1:], "topic": items.topic[1:]}
                                | ({"appeal": items.appeal[1:]} if v3 else {})), truth / "items.parquet")

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
        if v3:
            manifest = _v3_manifest(manifest, rows, va, te)
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


def _v3_manifest(manifest: dict, rows: _Rows, va: int, te: int) -> dict:
    """v3's manifest: v2's plus the ceilings without the item appeal, how long the exposure tail
    and the heavy users' histories are, and v3's click-model settings."""
    no_appeal = _sigmoid(rows.logit_without_appeal)  # as written to ground_truth (same ties)
    out = {}
    for key, value in manifest.items():
        out[key] = value
        if key in ("best_valid_auc_without_user_bias", "best_test_auc_without_user_bias"):
            split = "valid" if "valid" in key else "test"
            lo, hi = (va, te) if split == "valid" else (te, len(rows.label))
            out[f"best_{split}_auc_without_item_appeal"] = _auc(rows.label[lo:hi], no_appeal[lo:hi])
    out["world"] = "v3"
    targets = np.bincount(rows.target, minlength=int(rows.target.max()) + 1)[1:]
    top = np.sort(targets)[::-1][:max(1, len(targets) // 100)]
    heavy = rows.heavy_user[rows.user]
    out["exposure"] = {"top_1pct_items_row_share": float(top.sum() / len(rows.target)),
                       "items_never_a_target": int((targets == 0).sum())}
    out["long_history_users"] = {"user_share": float(rows.heavy_user.mean()), "row_share": float(heavy.mean()),
                                 "history_median": float(np.median(rows.hist_len[heavy]))}
    out["click_model"] = manifest["click_model"] | {
        "item_appeal_sd": V3_ITEM_APPEAL_SD, "popularity_exponent": V3_POPULARITY_EXPONENT,
        "popularity_rank": "global", "heavy_user_share": V3_HEAVY_USER_SHARE,
        "heavy_history_median": V3_HEAVY_HISTORY_MEDIAN, "heavy_history_sigma": V3_HEAVY_HISTORY_SIGMA}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmctr-demo-data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset root folder to create")
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", default="v2", choices=WORLDS,
                        help="click model: v2 (recency + per-user propensity, default), v3 (v2 + item appeal "
                             "only ids reveal, long-tailed exposure, long histories) or v1 (the earliest world)")
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
                                                "best_valid_auc_without_user_bias",
                                                "best_valid_auc_without_item_appeal", "positive_rate")
                      if k in manifest}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
