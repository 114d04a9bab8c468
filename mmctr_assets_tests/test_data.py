"""The data layer: every kind of bad input gets a clear error or a failed check."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from mmctr_assets.lib.data import checks, images, microlens
from mmctr_assets.lib.data.microlens import DataValidationError
from mmctr_assets.lib.io import file_fingerprint

N_ITEMS = 6


def interactions(with_label: bool = True, **overrides) -> pl.DataFrame:
    cols = {
        "user_id": [1, 2, 3],
        "item_seq": [[0, 0, 1, 2], [0, 3, 4, 5], [1, 2, 3, 4]],
        "item_id": [3, 6, 1],
        "likes_level": [1, 5, 10],
        "views_level": [2, 3, 4],
    }
    if with_label:
        cols["label"] = [1.0, 0.0, 1.0]
    else:
        cols = {"ID": [10, 11, 12], **cols}
    cols.update(overrides)
    return pl.DataFrame(cols, schema_overrides={"item_seq": pl.List(pl.Int64)})


def item_info(n: int = N_ITEMS) -> pl.DataFrame:
    emb = np.random.default_rng(0).normal(size=(n + 1, 128)).astype(np.float32)
    emb[0] = 0
    tags = [[0, 0, 0, 0, 0]] + [[0, 0, 0, i, i + 1] for i in range(1, n + 1)]
    return pl.DataFrame(
        {"item_id": np.arange(n + 1), "item_tags": tags, "item_emb_d128": emb.tolist()},
        schema_overrides={"item_tags": pl.List(pl.Int64), "item_emb_d128": pl.List(pl.Float32)},
    )


def write_dataset(root: Path, **tables: pl.DataFrame) -> Path:
    frames = {
        "train": interactions(),
        "valid": interactions(),
        "test": interactions(with_label=False),
        "item_info": item_info(),
    } | tables
    for name, frame in frames.items():
        path = microlens.table_path(root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(path)
    return root


def outcomes(root: Path, table: str) -> dict[str, checks.CheckOutcome]:
    frame = microlens.read_table(root, table)
    return {o.name: o for o in checks.content_checks(table, frame, N_ITEMS)}


def test_valid_dataset_passes_every_check(tmp_path):
    root = write_dataset(tmp_path)
    for table in ("train", "valid", "test", "item_info"):
        results = outcomes(root, table)
        assert set(results) == set(checks.CHECK_NAMES[table])
        assert all(o.passed for o in results.values()), [o.description for o in results.values()]


def test_missing_file_names_path_layout_and_remedy(tmp_path):
    with pytest.raises(DataValidationError) as err:
        microlens.read_table(tmp_path, "train")
    msg = str(err.value)
    assert str(tmp_path / "MicroLens_1M_x1" / "train.parquet") in msg
    assert "MicroLens_1M_x1/{train,valid,test,item_info}.parquet" in msg
    assert "MMCTR_DATA_DIR" in msg and "mmctr-demo-data" in msg


def test_missing_and_mistyped_columns_are_all_listed(tmp_path):
    bad = interactions().drop("views_level").with_columns(pl.col("likes_level").cast(pl.String))
    root = write_dataset(tmp_path, train=bad)
    with pytest.raises(DataValidationError) as err:
        microlens.read_table(root, "train")
    msg = str(err.value)
    assert "missing column 'views_level'" in msg
    assert "'likes_level' has dtype large_string" in msg and "expected integer" in msg


def test_unreadable_parquet_is_a_clear_error(tmp_path):
    root = write_dataset(tmp_path)
    microlens.table_path(root, "valid").write_bytes(b"not parquet at all")
    with pytest.raises(DataValidationError, match="not a readable parquet file"):
        microlens.read_table(root, "valid")


def test_dtypes_are_normalised(tmp_path):
    narrow = interactions().with_columns(pl.col("likes_level").cast(pl.Int32), pl.col("label").cast(pl.Int8))
    root = write_dataset(tmp_path, train=narrow)
    frame = microlens.read_table(root, "train")
    assert frame.schema["likes_level"] == pl.Int64 and frame.schema["label"] == pl.Float32


def test_variable_length_histories_fail(tmp_path):
    ragged = interactions(item_seq=[[0, 0, 1, 2], [3, 4, 5], [1, 2, 3, 4]])
    result = outcomes(write_dataset(tmp_path, train=ragged), "train")["history_fixed_length_left_padded"]
    assert not result.passed and "not a fixed-length list" in result.description
    assert result.details["first_bad_row"] == 1


def test_right_padded_histories_fail(tmp_path):
    right = interactions(item_seq=[[0, 0, 1, 2], [3, 4, 5, 0], [1, 2, 3, 4]])
    result = outcomes(write_dataset(tmp_path, train=right), "train")["history_fixed_length_left_padded"]
    assert not result.passed and result.details["first_bad_rows"] == [1]


def test_item_ids_outside_item_info_fail(tmp_path):
    root = write_dataset(tmp_path, valid=interactions(item_id=[3, 99, 1]),
                         test=interactions(False, item_seq=[[0, 0, 1, 2], [0, 3, 4, 7], [1, 2, 3, 4]]))
    v = outcomes(root, "valid")["item_ids_in_item_info"]
    assert not v.passed and "99" in v.description and v.details["bad_targets"] == 1
    t = outcomes(root, "test")["item_ids_in_item_info"]
    assert not t.passed and t.details["bad_histories"] == 1


def test_padding_id_as_target_fails(tmp_path):
    result = outcomes(write_dataset(tmp_path, train=interactions(item_id=[0, 1, 2])), "train")
    assert not result["item_ids_in_item_info"].passed


@pytest.mark.parametrize("labels", [[1.0, 2.0, 0.0], [1.0, float("nan"), 0.0], [1.0, None, 0.0]])
def test_labels_outside_zero_one_fail(tmp_path, labels):
    result = outcomes(write_dataset(tmp_path, train=interactions(label=labels)), "train")["labels_binary"]
    assert not result.passed and result.details["bad_rows"] == 1


@pytest.mark.parametrize("ids, problem", [([10, 10, 12], "duplicated"), ([10, None, 12], "missing")])
def test_duplicate_or_missing_test_ids_fail(tmp_path, ids, problem):
    result = outcomes(write_dataset(tmp_path, test=interactions(False, ID=ids)), "test")["test_ids_unique"]
    assert not result.passed and result.details[problem] == 1


def test_item_info_rows_must_be_item_ids_in_order(tmp_path):
    shuffled = item_info().sample(fraction=1.0, shuffle=True, seed=3)
    result = outcomes(write_dataset(tmp_path, item_info=shuffled), "item_info")
    assert not result["row_index_is_item_id"].passed


def test_item_info_padding_row_must_be_zero(tmp_path):
    info = item_info().with_columns(
        pl.when(pl.col("item_id") == 0).then(pl.lit([1, 0, 0, 0, 0])).otherwise(pl.col("item_tags")).alias("item_tags")
    )
    result = outcomes(write_dataset(tmp_path, item_info=info), "item_info")
    assert not result["padding_row_and_shapes"].passed


def test_history_length_summary_counts_only_real_items():
    summary = checks.history_length_summary(interactions())
    assert summary["min"] == 2 and summary["max"] == 4 and summary["median"] == 3
    assert summary["padding_share"] == pytest.approx(3 / 12)


def test_image_manifest_flags_missing_and_corrupt(tmp_path):
    folder = tmp_path / microlens.IMAGES_DIR
    folder.mkdir()
    Image.new("RGB", (8, 8), "red").save(folder / "1.jpg")
    (folder / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    manifest = images.image_manifest(tmp_path, np.array([1, 2, 3]))
    assert manifest.get_column("exists").to_list() == [True, True, False]
    assert manifest.get_column("decodable").to_list() == [True, False, False]


def test_fingerprint_changes_with_content(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    first = file_fingerprint(p)
    assert first == file_fingerprint(p)
    p.write_bytes(b"abd")
    assert file_fingerprint(p) != first


# ---- issue 9, part 5: each remaining bad input gets a clear message (one test per row) ----------


def test_empty_train_table_says_it_has_no_rows(tmp_path):
    result = outcomes(write_dataset(tmp_path, train=interactions().clear()), "train")
    assert not result["has_rows"].passed
    assert result["has_rows"].description.startswith("train.parquet has 0 rows")
    assert "has_rows" not in checks.WARNING_CHECKS  # blocking: nothing downstream can use it


@pytest.mark.parametrize("bad, shown", [(2.0, "2.0"), (None, "null"), (float("nan"), "nan")])
def test_bad_labels_name_their_own_rows_in_the_check_and_in_tensors(tmp_path, bad, shown):
    from mmctr_assets.lib.ctr import tensors

    # five rows, the bad values at rows 1 and 3 (a different value each, so a mismatch shows)
    frame = pl.concat([interactions(), interactions().head(2)]).with_columns(
        label=pl.Series([1.0, bad, 0.0, 5.0, 1.0], dtype=pl.Float64))
    check = outcomes(write_dataset(tmp_path, train=frame), "train")["labels_binary"]
    assert not check.passed and check.details["first_bad_rows"] == [1, 3]
    assert f"row 1: {shown}, row 3: 5.0" in check.description and "2 values" in check.description
    with pytest.raises(ValueError) as err:
        tensors.to_tensors(frame, 4)
    assert f"row 1: {shown}, row 3: 5.0" in str(err.value)


def test_invalid_utf8_title_names_file_column_and_fix(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_dataset(tmp_path)
    titles = pa.array([b"fine", b"bad \xff\xfe title"], pa.binary()).view(pa.string())  # no validation
    table = pa.table({"item_id": pa.array([1, 2], pa.int64()), "item_title": titles,
                      "item_tags": pa.array([[1], [2]], pa.list_(pa.int64()))})
    path = microlens.table_path(tmp_path, "item_feature")
    pq.write_table(table, path)
    with pytest.raises(DataValidationError) as err:
        microlens.read_table(tmp_path, "item_feature")
    message = str(err.value)
    assert str(path) in message and "'item_title'" in message and "UTF-8" in message and "re-export" in message


def test_nulls_inside_histories_fail_a_raw_blocking_check(tmp_path):
    train = interactions(item_seq=[[0, 0, 1, 2], [0, None, 4, 5], [1, 2, 3, 4]])
    result = outcomes(write_dataset(tmp_path, train=train), "train")["history_fixed_length_left_padded"]
    assert not result.passed and result.details["first_bad_rows"] == [1]
    assert "null entries" in result.description and "with 0" in result.description
    assert result.name not in checks.WARNING_CHECKS


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_organisers_embedding_is_a_raw_warning(tmp_path, bad):
    info = item_info()
    emb = np.asarray(info["item_emb_d128"].to_list(), dtype=np.float32)
    emb[4, 17] = bad
    info = info.with_columns(item_emb_d128=pl.Series(emb.tolist(), dtype=pl.List(pl.Float32)))
    result = outcomes(write_dataset(tmp_path, item_info=info), "item_info")
    check = result["item_emb_d128_finite"]
    assert not check.passed and check.details["first_bad_items"] == [4]
    assert "embedding_source: organisers" in check.description
    # a warning, not blocking: the default (fused) table never reads this column
    assert check.name in checks.WARNING_CHECKS
    assert result["row_index_is_item_id"].passed and result["padding_row_and_shapes"].passed


def test_image_manifest_paths_are_relative_to_the_data_dir(tmp_path):
    first, moved = tmp_path / "a", tmp_path / "b"
    for root in (first, moved):
        (root / microlens.IMAGES_DIR).mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(root / microlens.IMAGES_DIR / "1.jpg")
    m1 = images.image_manifest(first, np.array([1, 2]))
    m2 = images.image_manifest(moved, np.array([1, 2]))
    assert m1.equals(m2) and m1["image_path"].to_list() == ["item_images/1.jpg", "item_images/2.jpg"]
    resolved = images.resolve_image_paths(m2, moved)
    assert Path(resolved["image_path"][0]).is_file()
    assert resolved["image_path"][0] == str(moved / "item_images" / "1.jpg")


def test_a_negative_history_id_is_the_example_not_the_rows_largest_id():
    from mmctr_assets.lib.data import checks

    frame = pl.DataFrame({"item_id": [1, 2], "item_seq": [[0, 3, 4], [-5, 2, 4]]})
    outcome = checks.check_item_ids(frame, "train", n_items=4)
    assert not outcome.passed and "[-5]" in outcome.description and "[4]" not in outcome.description


# ---- issue 30: every real column kept --------------------------------------------------------

def item_feature(n: int = N_ITEMS, **overrides) -> pl.DataFrame:
    """item_feature as the real download has it: titles, tags, per-item levels, the organisers' vectors."""
    rng = np.random.default_rng(1)
    cols = {"item_id": np.arange(1, n + 1), "item_title": [f"t{i}" for i in range(n)],
            "item_tags": [[i, i + 1] for i in range(n)], "likes_level": [1] * n, "views_level": [10] * n,
            "txt_emb_BERT": rng.normal(size=(n, 768)).astype(np.float32).tolist(),
            "img_emb_CLIPRN50": rng.normal(size=(n, 1024)).astype(np.float32).tolist()} | overrides
    return pl.DataFrame(cols, schema_overrides={"item_tags": pl.List(pl.Int64), "txt_emb_BERT": pl.List(pl.Float32),
                                                "img_emb_CLIPRN50": pl.List(pl.Float32)})


def item_emb(n: int = N_ITEMS, ids=None) -> pl.DataFrame:
    rng = np.random.default_rng(2)
    ids = list(range(1, n + 1)) if ids is None else ids
    return pl.DataFrame({"item_id": ids} | {c: rng.normal(size=(len(ids), 128)).astype(np.float32).tolist()
                                            for c in microlens.ORGANISER_ITEM_EMB_COLUMNS},
                        schema_overrides={c: pl.List(pl.Float32) for c in microlens.ORGANISER_ITEM_EMB_COLUMNS})


def test_item_feature_keeps_levels_and_vectors_of_the_real_download_without_a_warning(tmp_path):
    root = write_dataset(tmp_path, item_feature=item_feature(), item_emb=item_emb())
    frame = microlens.read_table(root, "item_feature")
    assert frame.columns == ["item_id", "item_title", "item_tags", "likes_level", "views_level",
                             "txt_emb_BERT", "img_emb_CLIPRN50"]
    assert microlens.ignored_columns(root, "item_feature") == []
    got = outcomes(root, "item_feature")
    assert all(o.passed for o in got.values()), got
    assert "txt_emb_BERT (768-d), img_emb_CLIPRN50 (1024-d)" in got["precomputed_vectors_well_formed"].description
    emb = outcomes(root, "item_emb")
    assert all(o.passed for o in emb.values()), emb
    # the MicroLens format proper (title and tags only) still reads, levels and vectors optional
    root2 = write_dataset(tmp_path / "plain", item_feature=item_feature().select("item_id", "item_title", "item_tags"))
    plain = outcomes(root2, "item_feature")
    assert all(o.passed for o in plain.values()) and "optional" in plain["levels_in_range"].description


@pytest.mark.parametrize("levels, problem", [([0, 1, 2, 3, 4, 11], "values outside 0..10"),
                                             ([1, None, 2, 3, 4, 5], "null (missing) levels")])
def test_item_feature_levels_are_checked_like_the_rows(tmp_path, levels, problem):
    root = write_dataset(tmp_path, item_feature=item_feature(likes_level=levels))
    got = outcomes(root, "item_feature")["levels_in_range"]
    assert not got.passed and problem in got.description and got.details == {"likes_level": 1}
    assert "levels_in_range" not in checks.WARNING_CHECKS  # blocking, as for train/valid/test


def test_broken_precomputed_vectors_are_a_warning_naming_items_and_lengths(tmp_path):
    feature = item_feature()
    bert = feature.get_column("txt_emb_BERT").to_list()
    bert[2] = bert[2][:700]  # item 3: too short
    bert[4][0] = float("nan")  # item 5: NaN
    root = write_dataset(tmp_path, item_feature=feature.with_columns(pl.Series("txt_emb_BERT", bert,
                                                                               dtype=pl.List(pl.Float32))))
    got = outcomes(root, "item_feature")["precomputed_vectors_well_formed"]
    assert not got.passed and "precomputed_vectors_well_formed" in checks.WARNING_CHECKS
    assert got.details == {"txt_emb_BERT": {"bad_items": 2, "expected_length": 768, "first_bad_item_ids": [3, 5]}}


@pytest.mark.parametrize("ids, problem", [([1, 2, 3, 4, 5], "1 items of item_info without a row"),
                                          ([1, 2, 3, 4, 5, 6, 6], "1 repeated"),
                                          ([0, 1, 2, 3, 4, 5, 9], "1 ids outside item_info 0..6")])
def test_item_emb_ids_must_match_item_info(tmp_path, ids, problem):
    root = write_dataset(tmp_path, item_emb=item_emb(ids=ids))
    got = outcomes(root, "item_emb")["item_ids_match_item_info"]
    assert not got.passed and problem in got.description and "item_emb.parquet" in got.description


def test_item_emb_vectors_must_be_128_long_and_finite(tmp_path):
    frame = item_emb()
    v3 = frame.get_column("item_emb_d128_v3").to_list()
    v3[0][5] = float("inf")
    root = write_dataset(tmp_path, item_emb=frame.with_columns(pl.Series("item_emb_d128_v3", v3,
                                                                         dtype=pl.List(pl.Float32))))
    got = outcomes(root, "item_emb")["vectors_well_formed"]
    assert not got.passed and got.details["item_emb_d128_v3"]["first_bad_item_ids"] == [1]
    assert set(got.details) == {"item_emb_d128_v3"}
