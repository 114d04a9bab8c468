"""The freshness rule (defs/freshness.py): an asset refuses to run while the latest materialisation
attempt of an upstream asset (or partition) failed after its last success, whatever made it fail,
and leaves every earlier output byte-identical. One test per asset kind here (embedding, fusion and
scorer, study); training and serving are in test_defs_ctr.py, beside their outputs."""

import hashlib
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from mmctr_assets.defs import freshness
from mmctr_assets.lib.data import microlens

# ---- the rule on toy assets: records, partitions, this run, the escape hatch ---------------------

BROKEN: set[str] = set()
PARTS = dg.StaticPartitionsDefinition(["0", "1"])


@dg.asset
def source():
    if "source" in BROKEN:
        raise ValueError("source broken")


@dg.asset(partitions_def=PARTS)
def shards(context: dg.AssetExecutionContext):
    if context.partition_key in BROKEN:
        raise ValueError("shard broken")


class Cfg(freshness.FreshnessConfig):
    pass


@dg.asset(deps=[source])
def middle(context: dg.AssetExecutionContext, config: Cfg):
    freshness.require_fresh_upstream(context, config)


@dg.asset(deps=[middle, shards])
def leaf(context: dg.AssetExecutionContext, config: Cfg):
    freshness.require_fresh_upstream(context, config)


TOY = [source, shards, middle, leaf]


def _run(instance, selection, partition=None, config=None):
    return dg.materialize(TOY, selection=selection, instance=instance, partition_key=partition,
                          raise_on_error=False, run_config={"ops": config or {}})


def _error(result) -> str:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return failure.event_specific_data.error.message


@pytest.fixture
def toy(instance):
    BROKEN.clear()
    for key in ("0", "1"):
        assert _run(instance, ["shards"], key).success
    assert _run(instance, ["source", "middle", "leaf"]).success
    yield instance
    BROKEN.clear()


def test_failed_upstream_blocks_its_descendants_until_it_succeeds_again(toy):
    BROKEN.add("source")
    failed = _run(toy, ["source"])
    assert not failed.success
    for asset in ("middle", "leaf"):  # the child, and the grandchild through it
        refused = _run(toy, [asset])
        message = _error(refused)
        assert f"{asset} did not run: the latest materialisation of " in message
        assert f"source (run {failed.run_id[:8]} failure" in message
        assert "dg launch --assets source" in message and "allow_stale_upstream: true" in message
        assert not refused.asset_materializations_for_node(asset)
    # the escape hatch: runs, and says so at WARNING
    allowed = _run(toy, ["middle"], config={"middle": {"config": {"allow_stale_upstream": True}}})
    assert allowed.success
    warnings = [e.message for e in toy.all_logs(allowed.run_id) if e.level == 30]
    assert any("STALE upstream data" in w and failed.run_id[:8] in w for w in warnings), warnings
    # fixed and rematerialised together with its descendants in one run: fresh again
    BROKEN.clear()
    assert _run(toy, ["source", "middle", "leaf"]).success
    assert _run(toy, ["leaf"]).success


def test_a_failed_partition_is_named_and_blocks_until_that_partition_succeeds(toy):
    BROKEN.add("1")
    failed = _run(toy, ["shards"], "1")
    assert not failed.success
    assert _run(toy, ["middle"]).success  # shards is not middle's upstream
    message = _error(_run(toy, ["leaf"]))
    assert f"shards partition 1 (run {failed.run_id[:8]} failure" in message and "partition 0" not in message
    BROKEN.clear()
    assert _run(toy, ["shards"], "0").success
    assert not _run(toy, ["leaf"]).success  # partition 0 succeeding does not repair partition 1
    assert _run(toy, ["shards"], "1").success
    assert _run(toy, ["leaf"]).success


def test_a_cancelled_refresh_counts_as_failed_and_one_in_progress_does_not(toy):
    from dagster._core.storage.dagster_run import DagsterRunStatus

    BROKEN.add("source")
    failed = _run(toy, ["source"])
    toy.run_storage.handle_run_event(failed.run_id, dg.DagsterEvent(
        "PIPELINE_CANCELED", job_name=failed.dagster_run.job_name, message="cancelled"))
    assert toy.get_run_by_id(failed.run_id).status == DagsterRunStatus.CANCELED
    assert "canceled" in _error(_run(toy, ["middle"]))
    toy.run_storage.handle_run_event(failed.run_id, dg.DagsterEvent(
        "PIPELINE_START", job_name=failed.dagster_run.job_name, message="started again"))
    assert toy.get_run_by_id(failed.run_id).status == DagsterRunStatus.STARTED
    assert _run(toy, ["middle"]).success


# ---- the project's assets ---------------------------------------------------------------------------


def _all_assets():
    """Every asset of the code location, so a run's asset graph knows every ancestor (as the CLI's does)."""
    from mmctr_assets.defs import ctr, embeddings, raw, scorer, tuning

    return [*raw.raw_assets, *embeddings.defs.assets, *scorer.defs.assets, *tuning.defs.assets, *ctr.defs.assets]


def sha256_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def materialize(selection, resources, instance, **kwargs):
    return dg.materialize(_all_assets(), selection=selection, resources=resources, instance=instance,
                          raise_on_error=False, **kwargs)


@pytest.fixture
def task1_copy(task1_outputs, tmp_path) -> Path:
    return Path(shutil.copytree(task1_outputs[0], tmp_path / "outputs"))


def _refused(result, asset: str, upstream: str, failed_run: str) -> str:
    assert not result.success and not result.asset_materializations_for_node(asset)
    message = _error(result)
    assert f"{asset} did not run" in message and f"{upstream} (run {failed_run[:8]} failure" in message, message
    return message


def test_embedding_refuses_while_raw_train_failed_for_a_missing_column(task1_copy, data_copy, make_resources,
                                                                         instance):
    resources = make_resources(data_copy, task1_copy)
    path = microlens.table_path(data_copy, "train")
    pl.read_parquet(path).drop("label").write_parquet(path)
    failed = materialize(["raw_train"], resources, instance)
    assert not failed.success  # an error before any check ran: the checks stay planned
    before = sha256_tree(task1_copy)
    _refused(materialize(["item2vec_embeddings"], resources, instance), "item2vec_embeddings", "raw_train",
             failed.run_id)
    assert sha256_tree(task1_copy) == before


def test_fusion_and_scorer_refuse_while_a_clip_shard_failed(task1_copy, tiny_data, make_resources, instance,
                                                             tmp_path):
    from conftest import SHARDS

    resources = make_resources(tiny_data, task1_copy)
    key = SHARDS[-1]
    bad = {"ops": {"clip_embeddings": {"config": {"model": str(tmp_path / "no-such-clip")}}}}
    failed = materialize(["clip_embeddings"], resources, instance, partition_key=key, run_config=bad)
    assert not failed.success
    before = sha256_tree(task1_copy)
    message = _refused(materialize(["fused_item_embeddings"], resources, instance), "fused_item_embeddings",
                       f"clip_embeddings partition {key}", failed.run_id)
    assert "dg launch --assets clip_embeddings" in message
    # task1_score reads the fused table, built from that shard: refused through it
    _refused(materialize(["task1_score"], resources, instance), "task1_score", f"clip_embeddings partition {key}",
             failed.run_id)
    assert sha256_tree(task1_copy) == before
    assert not (task1_copy.parent / "mlflow.db").exists()  # refused before MLflow was opened


def test_study_refuses_while_raw_valid_failed_a_blocking_check(task1_copy, data_copy, make_resources, instance):
    resources = make_resources(data_copy, task1_copy)
    path = microlens.table_path(data_copy, "valid")
    pl.read_parquet(path).with_columns(label=pl.lit(0.0)).write_parquet(path)
    failed = materialize(["raw_valid"], resources, instance)
    assert not failed.success
    before = sha256_tree(task1_copy)
    _refused(materialize(["ctr_tuning"], resources, instance), "ctr_tuning", "raw_valid", failed.run_id)
    assert sha256_tree(task1_copy) == before
    assert not (task1_copy / "ctr_tuning").exists()
