"""raw_* assets run through Dagster: snapshots, metadata, and blocking checks on bad data."""

from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from mmctr_assets.defs.raw import raw_assets
from mmctr_assets.lib.data import microlens
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
    for table in ("train", "valid", "test", "item_info", "item_feature", "item_emb"):
        snap = pl.read_parquet(out.raw(table))
        source = pl.read_parquet(microlens.table_path(tiny_data, table))
        assert snap.height == source.height and snap.columns == source.columns  # every column kept
        # no warning for any column of the real download's layout (issue 30)
        assert "warnings" not in result.asset_materializations_for_node(f"raw_{table}")[0].metadata
    assert {"likes_level", "views_level", "txt_emb_BERT", "img_emb_CLIPRN50"} <= set(
        pl.read_parquet(out.raw("item_feature")).columns)
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
    pl.read_parquet(path).with_columns(
        pl.when(pl.int_range(pl.len()) == 7).then(2.0).otherwise(pl.col("label")).alias("label")
    ).write_parquet(path)
    result = materialize_raw(make_resources(data_copy, tmp_path / "out"), instance)
    checks = check_results(result)
    assert checks["raw_train:labels_binary"] is False
    assert checks["raw_valid:labels_binary"] is True
    failed = [e for e in result.all_events
              if e.event_type_value == "ASSET_CHECK_EVALUATION" and not e.asset_check_evaluation_data.passed]
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


def test_optional_item_emb_absent_says_not_present_and_fails_nothing(data_copy, tmp_path, instance, make_resources):
    microlens.table_path(data_copy, "item_emb").unlink()
    resources = make_resources(data_copy, tmp_path / "out")
    result = materialize_raw(resources, instance)
    assert result.success and all(check_results(result).values())
    meta = result.asset_materializations_for_node("raw_item_emb")[0].metadata
    assert meta["present"].value is False and meta["dagster/row_count"].value == 0
    snap = pl.read_parquet(resources["storage"].raw("item_emb"))
    assert snap.height == 0 and snap.columns == ["item_id", *microlens.ORGANISER_ITEM_EMB_COLUMNS]


def test_item_emb_of_other_items_is_refused_and_not_snapshotted(data_copy, tmp_path, instance, make_resources):
    path = microlens.table_path(data_copy, "item_emb")
    pl.read_parquet(path).head(-3).write_parquet(path)  # the last three items have no row
    resources = make_resources(data_copy, tmp_path / "out")
    result = materialize_raw(resources, instance)
    assert check_results(result)["raw_item_emb:item_ids_match_item_info"] is False
    assert not resources["storage"].raw("item_emb").exists()
    assert check_results(result)["raw_train:labels_binary"] is True  # the other tables are untouched


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


# ---- issue 9, part 4: a failed blocking check leaves the previous good output in place ----------


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_failed_blocking_check_keeps_every_earlier_output(data_copy, tmp_path, instance, make_resources):
    from mmctr_assets.defs.embeddings import item2vec_embeddings

    out = tmp_path / "out"
    resources = make_resources(data_copy, out)
    assets = [*raw_assets, item2vec_embeddings]
    assert dg.materialize(assets, resources=resources, instance=instance).success
    good = instance.get_latest_materialization_event(dg.AssetKey("raw_train"))
    before = _files(out)

    path = microlens.table_path(data_copy, "train")
    pl.read_parquet(path).with_columns(
        label=pl.when(pl.int_range(pl.len()) == 7).then(2.0).otherwise(pl.col("label"))).write_parquet(path)
    result = dg.materialize(assets, resources=resources, instance=instance, raise_on_error=False)

    assert not result.success
    assert _files(out) == before  # every earlier output byte-identical, the snapshots of good tables too
    assert check_results(result)["raw_train:labels_binary"] is False
    # not recorded as materialised: the latest materialisation still describes the file on disk
    assert not result.asset_materializations_for_node("raw_train")
    assert instance.get_latest_materialization_event(dg.AssetKey("raw_train")).run_id == good.run_id
    # the failed check is what the instance (automation conditions, UI) reads for raw_train now
    key = dg.AssetCheckKey(dg.AssetKey("raw_train"), "labels_binary")
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    assert record.run_id == result.run_id and record.status.value == "FAILED"
    # downstream did not run; the step failure says what failed and that the old snapshot was kept
    started = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    assert "raw_train" in started and "item2vec_embeddings" not in started
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE" and e.step_key == "raw_train")
    message = failure.event_specific_data.error.message
    assert "raw_train was NOT materialised" in message and "labels_binary" in message
    assert "(row 7: 2.0)" in message and "left unchanged" in message and good.run_id[:8] in message

    # fixed data publishes again
    pl.read_parquet(path).with_columns(label=pl.col("label").clip(0, 1)).write_parquet(path)
    again = dg.materialize(assets, resources=resources, instance=instance)
    assert again.success and check_results(again)["raw_train:labels_binary"] is True


def test_first_run_with_bad_data_publishes_nothing(data_copy, tmp_path, instance, make_resources):
    path = microlens.table_path(data_copy, "train")
    frame = pl.read_parquet(path)
    frame.clear().write_parquet(path)  # right schema, no rows
    result = materialize_raw(make_resources(data_copy, tmp_path / "out"), instance)
    assert check_results(result)["raw_train:has_rows"] is False
    assert not (tmp_path / "out" / "raw" / "train.parquet").exists()
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE" and e.step_key == "raw_train")
    message = failure.event_specific_data.error.message
    assert "train.parquet has 0 rows" in message and "nothing was written" in message


# ---- issue 9, part 5 rows that need the Dagster layer -----------------------------------------------


def test_label_column_in_test_table_is_a_warning_in_metadata(data_copy, tmp_path, instance, make_resources):
    path = microlens.table_path(data_copy, "test")
    pl.read_parquet(path).with_columns(label=pl.lit(1.0)).write_parquet(path)
    resources = make_resources(data_copy, tmp_path / "out")
    result = materialize_raw(resources, instance, selection=["raw_item_info", "raw_test"])
    assert result.success
    warnings = result.asset_materializations_for_node("raw_test")[0].metadata["warnings"].value
    assert any("has a 'label' column" in w and "ignored" in w for w in warnings)
    assert "label" not in pl.read_parquet(resources["storage"].raw("test")).columns


def test_non_finite_organisers_embedding_warns_without_blocking(data_copy, tmp_path, instance, make_resources):
    path = microlens.table_path(data_copy, "item_info")
    info = pl.read_parquet(path)
    emb = np.asarray(info["item_emb_d128"].to_list())
    emb[5, 3] = np.nan
    info.with_columns(pl.Series("item_emb_d128", emb.tolist(), dtype=info.schema["item_emb_d128"])).write_parquet(path)
    result = materialize_raw(make_resources(data_copy, tmp_path / "out"), instance,
                             selection=["raw_item_info", "raw_train"])
    assert result.success  # a warning: raw_train (downstream) still ran
    evaluation = next(e.asset_check_evaluation_data for e in result.all_events
                      if e.event_type_value == "ASSET_CHECK_EVALUATION"
                      and e.asset_check_evaluation_data.check_name == "item_emb_d128_finite")
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert "[5]" in evaluation.description


def test_image_manifest_survives_a_move_of_the_data_folder(data_copy, tmp_path, instance, make_resources):
    import shutil

    first = make_resources(data_copy, tmp_path / "out1")
    assert materialize_raw(first, instance, selection=["raw_item_info", "raw_item_images"]).success
    moved = shutil.move(str(data_copy), str(tmp_path / "moved"))
    second = make_resources(moved, tmp_path / "out2")
    assert materialize_raw(second, instance, selection=["raw_item_info", "raw_item_images"]).success
    manifests = [r["storage"].image_manifest().read_bytes() for r in (first, second)]
    assert manifests[0] == manifests[1]
    resolved = second["storage"].read_image_manifest().filter(pl.col("exists"))
    assert resolved["image_path"].str.starts_with(str(moved)).all()
    assert all(Path(p).is_file() for p in resolved["image_path"].head(5).to_list())


@pytest.mark.parametrize("table, damage, check, words", [
    ("item_feature", lambda f: pl.concat([f, f.head(3)]), "raw_item_feature:item_ids_unique",
     ["item_feature.parquet, column item_id: 3 item ids appear on more than one row", "unique('item_id'"]),
    ("valid", lambda f: f.with_columns(label=pl.lit(0.0)), "raw_valid:valid_has_both_classes",
     ["valid.parquet, column label: all", "are 0 (non-clicks)", "AUC is undefined on one class"]),
])
def test_bad_table_after_a_good_one_is_refused_and_the_snapshot_kept(data_copy, tmp_path, instance, make_resources,
                                                                      table, damage, check, words):
    out = tmp_path / "out"
    resources = make_resources(data_copy, out)
    assert materialize_raw(resources, instance).success
    before = _files(out)
    path = microlens.table_path(data_copy, table)
    damage(pl.read_parquet(path)).write_parquet(path)

    result = materialize_raw(resources, instance)
    assert not result.success and check_results(result)[check] is False
    assert _files(out) == before  # the good snapshot, byte for byte
    asset = check.split(":")[0]
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE" and e.step_key == asset)
    message = failure.event_specific_data.error.message
    assert f"{asset} was NOT materialised" in message
    for w in words:
        assert w in message


def test_a_model_does_not_train_on_a_snapshot_whose_newer_input_was_refused(data_copy, tmp_path, instance,
                                                                              make_resources):
    from mmctr_assets.defs.ctr import dcn_din_model

    resources = make_resources(data_copy, tmp_path / "out")
    assert materialize_raw(resources, instance).success
    path = microlens.table_path(data_copy, "train")
    pl.read_parquet(path).with_columns(label=pl.lit(3.0)).write_parquet(path)
    refused = materialize_raw(resources, instance)
    assert not refused.success  # raw_train refused, old snapshot kept

    result = dg.materialize([dcn_din_model], resources=resources, instance=instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert "dcn_din_model did not run" in message and f"raw_train (run {refused.run_id[:8]} failure" in message
    assert "dg launch --assets raw_train" in message
    assert not (tmp_path / "out" / "dcn_din_model").exists()  # nothing trained, nothing written


def test_deleted_covers_are_refused_before_content_embeddings_change_unless_text_only_is_asked_for(
        data_copy, tmp_path, instance, make_resources):
    import shutil

    out = tmp_path / "out"
    resources = make_resources(data_copy, out)
    assert materialize_raw(resources, instance).success
    before = _files(out)
    shutil.rmtree(data_copy / "item_images")

    result = materialize_raw(resources, instance)
    assert not result.success and check_results(result)["raw_item_images:covers_present"] is False
    assert _files(out) == before  # the manifest of the good covers, byte for byte
    failure = next(e for e in result.all_events
                   if e.event_type_value == "STEP_FAILURE" and e.step_key == "raw_item_images")
    message = failure.event_specific_data.error.message
    assert "covers missing" in message and "item_images" in message and "allow_text_only: true" in message
    import logging
    loud = [e.user_message for e in instance.all_logs(result.run_id) if e.level >= logging.ERROR]
    assert any("allow_text_only: true" in m for m in loud)  # logged at ERROR, not DEBUG

    opted_in = materialize_raw(resources, instance, run_config={"ops": {"raw_item_images": {"config": {
        "allow_text_only": True}}}})
    assert opted_in.success and check_results(opted_in)["raw_item_images:covers_present"] is True
