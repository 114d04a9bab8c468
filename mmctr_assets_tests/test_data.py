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
    root = write_dataset(tmp_path, valid=interactions(item_id=[3, 99, 1]), test=interactions(False, item_seq=[[0, 0, 1, 2], [0, 3, 4, 7], [1, 2, 3, 4]]))
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
