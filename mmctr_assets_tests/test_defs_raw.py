"""raw_* assets run through Dagster: snapshots, metadata, and blocking checks on bad data."""

import polars as pl
import pytest

import dagster as dg
from mmctr_assets.defs.raw import raw_assets
from mmctr_assets.lib.data import checks, microlens
from mmctr_assets.lib.io import file_fingerprint


def materialize_raw(resources, instance, **kwargs):
    return dg.materialize(raw_assets, resources=resources, instance=instance, raise_on_error=False, **kwargs)


def check_results(result) -> dict[str, bool]:
    return {
        f"{e.asset_check_evaluation_data.asset_key.to_user_string()}:{e.asset_check_evaluation_data.check_name}":
            e.asset_check_evaluation_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def test_raw_assets_snapshot_every_table_with_metadata(resources, instance, tiny_data):
    result = materialize_raw(resources, instance)
    assert result.success
    out = resources["storage"]
    for table in ("train", "valid", "test", "item_info", "item_feature"):
        snap = pl.read_parquet(out.raw(table))
        assert snap.height == pl.read_parquet(microlens.table_path(tiny_data, table)).height
    assert pl.read_parquet(out.raw("train")).schema["label"] == pl.Float32
    checks = check_results(result)
    assert checks and all(checks.values()), checks
    meta = result.asset_materializations_for_node("raw_train")[0].metadata
    assert meta["dagster/row_count"].value == pl.read_parquet(out.raw("train")).height
    assert 0.15 < meta["positive_rate"].value < 0.35
    assert meta["history_length"].value["min"] >= 3
    manifest = pl.read_parquet(out.out("raw", "item_images.parquet"))
    images_meta = result.asset_materializations_for_node("raw_item_images")[0].metadata
    assert images_meta["missing_images"].value == manifest.filter(~pl.col("exists")).height > 0
    assert images_meta["corrupt_images"].value > 0


def test_bad_labels_fail_a_blocking_check_and_say_where(data_copy, tmp_path, instance, make_resources):
    path = microlens.table_path(data_copy, "train")
    pl.read_parquet(path).with_columns(pl.when(pl.int_range(pl.len()) == 7).then(2.0).otherwise(pl.col("label")).alias("label")).write_parquet(path)
    result = materialize_raw(make_resources(data_copy, tmp_path / "out"), instance)
    checks = check_results(result)
    assert checks["raw_train:labels_binary"] is False
    assert checks["raw_valid:labels_binary"] is True
    failed = [e for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION" and not e.asset_check_evaluation_data.passed]
    assert "(row 7: 2.0)" in failed[0].asset_check_evaluation_data.description


def test_missing_source_file_fails_with_the_path(data_copy, tmp_path, instance, make_resources):
    microlens.table_path(data_copy, "valid").unlink()
    result = materialize_raw(make_resources(data_copy, tmp_path / "out"), instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE" and e.step_key == "raw_valid")
    message = str(failure.event_specific_data.error)
    assert "valid.parquet" in message and "MMCTR_DATA_DIR" in message
    # the tables that could be read were still snapshotted
    assert (tmp_path / "out" / "raw" / "train.parquet").exists()


def test_optional_item_feature_absent_gives_empty_snapshot(data_copy, tmp_path, instance, make_resources):
    microlens.table_path(data_copy, "item_feature").unlink()
    resources = make_resources(data_copy, tmp_path / "out")
    result = materialize_raw(resources, instance)
    assert result.success
    snap = pl.read_parquet(resources["storage"].raw("item_feature"))
    assert snap.height == 0 and set(snap.columns) == {"item_id", "item_title", "item_tags"}


@pytest.mark.parametrize("table", ["train", "test"])
def test_fingerprint_is_the_data_version(resources, instance, tiny_data, table):
    result = materialize_raw(resources, instance, selection=["raw_item_info", f"raw_{table}"])
    mat = result.asset_materializations_for_node(f"raw_{table}")[0]
    fingerprint = file_fingerprint(microlens.table_path(tiny_data, table))
    assert mat.metadata["data_fingerprint"].value == fingerprint
    assert mat.tags["dagster/data_version"] == fingerprint
