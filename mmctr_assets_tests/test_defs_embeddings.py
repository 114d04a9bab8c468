"""Task 1 assets through Dagster: CLIP shards, item2vec, fusion into item_info_updated."""

import shutil

import dagster as dg
import mlflow
import numpy as np
import polars as pl
import pytest
from conftest import RANGE, SHARDS, clip_config

from mmctr_assets.defs import embeddings as task1
from mmctr_assets.lib.data import microlens
from mmctr_assets.lib.embeddings import clip_shards as clip_encoder  # encodes each shard


@pytest.fixture
def built(task1_outputs):
    return task1_outputs


@pytest.fixture
def outputs(built, tmp_path):
    """A private copy of the built outputs (tests may overwrite shards)."""
    return shutil.copytree(built[0], tmp_path / "outputs")


def shard_bytes(out) -> dict[str, bytes]:
    return {k: (out / "clip_embeddings" / f"shard-{k}.parquet").read_bytes() for k in SHARDS}


def assert_same_embeddings(path, expected: bytes) -> None:
    """The shard at ``path`` holds the items, text-only flags and (within float rounding) vectors of
    the shard whose file bytes were ``expected``.

    A re-encoded shard is not promised bit-identical: CLIP's matmuls sum in an order that depends on
    the torch thread count (the session fixture encodes beside item2vec on one core fewer than a run
    of clip_embeddings alone) and on the CPU's kernels (AVX2 vs AVX-512), so the last bits of a unit
    vector's components move (seen: 4.5e-8). 1e-5 is far above that rounding and far below what a
    different model, item or image changes (components of order 1e-2).
    """
    import io

    got, want = pl.read_parquet(path), pl.read_parquet(io.BytesIO(expected))
    assert got.columns == want.columns
    for column in got.columns:
        if column != "clip_emb":
            assert got.get_column(column).equals(want.get_column(column)), column
    np.testing.assert_allclose(got.get_column("clip_emb").to_numpy(), want.get_column("clip_emb").to_numpy(),
                               rtol=0, atol=1e-5)


def test_range_of_shards_is_one_run_with_one_model_load(built, tiny_data):
    out, result, _ = built
    frames = [pl.read_parquet(out / "clip_embeddings" / f"shard-{k}.parquet") for k in SHARDS]
    ids = pl.concat(frames).get_column("item_id").sort()
    n_items = pl.read_parquet(microlens.table_path(tiny_data, "item_info")).height - 1
    assert ids.to_list() == list(range(1, n_items + 1))  # every real item once, never padding 0
    for k, frame in zip(SHARDS, frames):
        assert (frame.get_column("item_id") % len(SHARDS) == int(k)).all()
        emb = frame.get_column("clip_emb").to_numpy()
        assert emb.shape[1] == 512 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    mats = result.asset_materializations_for_node("clip_embeddings")
    assert sorted(m.partition for m in mats) == SHARDS
    assert mats[0].metadata["random_weights"].value is True
    assert built[2] == 1  # the encoder was loaded (and announced) once for all shards


def test_text_only_fallback_is_reported(built, tiny_data):
    out, result, _ = built
    manifest = pl.read_parquet(out / "raw" / "item_images.parquet")
    broken = set(manifest.filter(~pl.col("decodable")).get_column("item_id").to_list())
    clip = pl.concat(pl.read_parquet(p) for p in sorted((out / "clip_embeddings").glob("shard-*.parquet")))
    assert set(clip.filter("text_only").get_column("item_id").to_list()) == broken
    meta = result.asset_materializations_for_node("clip_embeddings")[0].metadata
    assert meta["text_only_items"].value == len(broken) > 0


@pytest.mark.float_repro
def test_one_partition_recomputes_only_that_shard(outputs, tiny_data, tiny_clip_dir, instance, make_resources):
    before = shard_bytes(outputs)
    for k in SHARDS:
        (outputs / "clip_embeddings" / f"shard-{k}.parquet").touch()
    mtimes = {k: (outputs / "clip_embeddings" / f"shard-{k}.parquet").stat().st_mtime_ns for k in SHARDS}
    result = dg.materialize(
        [task1.clip_embeddings],
        resources=make_resources(tiny_data, outputs),
        instance=instance,
        partition_key="1",
        run_config=clip_config(tiny_clip_dir),
    )
    assert result.success
    assert [m.partition for m in result.asset_materializations_for_node("clip_embeddings")] == ["1"]
    after = {k: (outputs / "clip_embeddings" / f"shard-{k}.parquet").stat().st_mtime_ns for k in SHARDS}
    assert [k for k in SHARDS if after[k] != mtimes[k]] == ["1"]
    now = shard_bytes(outputs)
    assert all(now[k] == before[k] for k in SHARDS if k != "1")  # not rewritten: the very same bytes
    assert_same_embeddings(outputs / "clip_embeddings" / "shard-1.parquet", before["1"])  # same model and items


def test_clip_leaves_a_core_for_item2vec_in_the_same_run_unless_item2vec_runs_fast(
        outputs, tiny_data, tiny_clip_dir, instance, make_resources, monkeypatch):
    """item2vec's one worker is a whole-graph run's critical path: CLIP beside it takes all cores
    but one, and all of them when it runs without item2vec. In item2vec's fast mode (workers: 0)
    CLIP leaves nothing: each step takes every free core, one after the other, and item2vec runs
    one gensim worker per core it got (not reproducible, and its metadata says so)."""
    from mmctr_assets.lib.embeddings import clip

    monkeypatch.setattr(clip, "available_cpus", lambda: 3)

    def run(assets, item2vec: dict | None = None):
        config = clip_config(tiny_clip_dir)
        if item2vec is not None:
            config["ops"]["item2vec_embeddings"] = {"config": item2vec}
        result = dg.materialize(assets, resources=make_resources(tiny_data, outputs), instance=instance, tags=RANGE,
                                run_config=config)
        assert result.success
        return {node: result.asset_materializations_for_node(node)[0].metadata
                for node in ("clip_embeddings", "item2vec_embeddings") if result.asset_materializations_for_node(node)}

    both = [task1.clip_embeddings, task1.item2vec_embeddings]
    assert run([task1.clip_embeddings])["clip_embeddings"]["cpu_cores"].value == 3
    reproducible = run(both)
    assert reproducible["clip_embeddings"]["cpu_cores"].value == 2
    assert (reproducible["item2vec_embeddings"]["workers"].value, reproducible["item2vec_embeddings"]["deterministic"]
            .value) == (1, True)
    fast = run(both, {"workers": 0})
    assert fast["clip_embeddings"]["cpu_cores"].value == 3
    assert (fast["item2vec_embeddings"]["workers"].value, fast["item2vec_embeddings"]["deterministic"].value) == (
        3, False)


@pytest.mark.float_repro
def test_failed_shard_leaves_other_shards_untouched(outputs, tiny_data, tiny_clip_dir, instance, make_resources,
                                                    monkeypatch):
    before = shard_bytes(outputs)
    for k in SHARDS:  # mark every file so we can tell which were rewritten
        (outputs / "clip_embeddings" / f"shard-{k}.parquet").write_bytes(b"old " + k.encode())
    real_encode = clip_encoder.encode_items

    def encode_failing_on_shard_2(items, bundle, **kwargs):
        if (items.get_column("item_id") % len(SHARDS) == 2).all():
            raise OSError("simulated: the GPU fell off the bus while encoding shard 2")
        return real_encode(items, bundle, **kwargs)

    monkeypatch.setattr(clip_encoder, "encode_items", encode_failing_on_shard_2)
    result = dg.materialize(
        [task1.clip_embeddings],
        resources=make_resources(tiny_data, outputs),
        instance=instance,
        tags=RANGE,
        run_config=clip_config(tiny_clip_dir),
        raise_on_error=False,
    )
    assert not result.success
    now = {k: (outputs / "clip_embeddings" / f"shard-{k}.parquet").read_bytes() for k in SHARDS}
    for k in ("0", "1"):  # finished before the failure: complete
        assert_same_embeddings(outputs / "clip_embeddings" / f"shard-{k}.parquet", before[k])
    assert now["2"] == b"old 2" and now["3"] == b"old 3"  # failed and not reached: previous files intact
    leftovers = [p.name for p in (outputs / "clip_embeddings").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no half-written temp files

    monkeypatch.setattr(clip_encoder, "encode_items", real_encode)
    retry = dg.materialize(
        [task1.clip_embeddings], resources=make_resources(tiny_data, outputs), instance=instance,
        partition_key="2", run_config=clip_config(tiny_clip_dir),
    )
    assert retry.success
    assert_same_embeddings(outputs / "clip_embeddings" / "shard-2.parquet", before["2"])


def test_missing_shard_tells_which_command_to_run(outputs, tiny_data, instance, make_resources):
    (outputs / "clip_embeddings" / "shard-3.parquet").unlink()
    result = dg.materialize(
        [task1.fused_item_embeddings], resources=make_resources(tiny_data, outputs), instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error)
    assert "['3']" in message and "--partition" in message


def test_item2vec_covers_history_items_and_never_padding(built):
    out, result, _ = built
    i2v = pl.read_parquet(out / "item2vec_embeddings" / "embeddings.parquet")
    ids = i2v.get_column("item_id")
    assert 0 not in ids.to_list() and ids.min() >= 1
    assert i2v.get_column("i2v_emb").to_numpy().shape[1] == 128
    meta = result.asset_materializations_for_node("item2vec_embeddings")[0].metadata
    assert meta["items_with_vector"].value == len(ids)


def test_item_info_updated_keeps_schema_and_passes_checks(built, tiny_data):
    out, result, _ = built
    source = pl.read_parquet(microlens.table_path(tiny_data, "item_info"))
    updated = pl.read_parquet(out / "item_info_updated.parquet")
    assert updated.schema == source.schema
    assert updated.get_column("item_id").equals(source.get_column("item_id"))
    assert updated.get_column("item_tags").equals(source.get_column("item_tags"))
    emb = updated.get_column("item_emb_d128").list.to_array(128).to_numpy()
    assert not emb[0].any()
    assert np.allclose(np.linalg.norm(emb[1:], axis=1), 1, atol=1e-4)
    assert not np.allclose(emb, source.get_column("item_emb_d128").list.to_array(128).to_numpy())
    checks = [e.asset_check_evaluation_data for e in result.all_events
              if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    fused_check = next(c for c in checks if c.check_name == "item_info_updated_valid")
    assert fused_check.passed
    meta = result.asset_materializations_for_node("fused_item_embeddings")[0].metadata
    assert 0 < meta["pca_explained_variance"].value <= 1
    assert meta["projection"].value.startswith("![")


def test_fusion_run_is_in_mlflow_with_its_plot(built):
    out, result, _ = built
    meta = result.asset_materializations_for_node("fused_item_embeddings")[0].metadata
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.parent / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("mmctr").experiment_id], "tags.stage = 'task1'"
    )
    assert len(runs) == 1 and runs[0].info.run_id in meta["mlflow_run"].value
    assert runs[0].data.params["alpha"] == "0.5"
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id, "plots")] == ["plots/embedding_projection.png"]


def test_failed_fusion_check_keeps_the_previous_deliverable(outputs, tiny_data, instance, make_resources, monkeypatch):
    """The fusion's inputs are validated upstream, so its own check is the last line of defence:
    plant a failure in the validator and the previous item_info_updated must survive."""
    from mmctr_assets.lib.embeddings import fusion

    before = (outputs / "item_info_updated.parquet").read_bytes()
    monkeypatch.setattr(fusion, "validate_item_embeddings", lambda *a, **k: ["item 5: norm 0.5 (planted)"])
    result = dg.materialize([task1.fused_item_embeddings], resources=make_resources(tiny_data, outputs),
                            instance=instance, raise_on_error=False)
    assert not result.success
    assert (outputs / "item_info_updated.parquet").read_bytes() == before
    evaluation = next(e.asset_check_evaluation_data for e in result.all_events
                      if e.event_type_value == "ASSET_CHECK_EVALUATION")
    assert not evaluation.passed and "planted" in evaluation.description
    assert not result.asset_materializations_for_node("fused_item_embeddings")
    assert not [p for p in outputs.iterdir() if p.name.startswith(".")]


def test_fusion_does_not_recreate_a_deleted_store_that_served_a_model(outputs, tiny_data, instance, make_resources):
    """issue 29: with a model.pt in the output folder, an empty new MLflow store would let the next
    dcn_din_model be promoted as the "first" version; fusion logs to MLflow first in a full run."""
    (outputs / "dcn_din_model").mkdir()
    (outputs / "dcn_din_model" / "model.pt").write_bytes(b"served from the store that is gone")
    before = (outputs / "item_info_updated.parquet").read_bytes()
    result = dg.materialize([task1.fused_item_embeddings], resources=make_resources(tiny_data, outputs),
                            instance=instance, raise_on_error=False)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    db = outputs.parent / "mlflow.db"
    assert f"MLflow store {db} does not exist" in str(failure.event_specific_data.error) and not db.exists()
    assert (outputs / "item_info_updated.parquet").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# task1_score: the fixed DIN scorer of an item table


def score(outputs, tiny_data, make_resources, instance, source: str = "fused", **kwargs):
    from mmctr_assets.defs import scorer

    return dg.materialize(
        [scorer.task1_score], resources=make_resources(tiny_data, outputs), instance=instance,
        run_config={"ops": {"task1_score": {"config": {"embedding_source": source}}}}, **kwargs,
    )


@pytest.fixture(scope="module")
def scored(task1_outputs, tiny_data, tmp_path_factory, make_resources):
    out = shutil.copytree(task1_outputs[0], tmp_path_factory.mktemp("scored") / "outputs")
    with dg.instance_for_test() as instance:
        result = score(out, tiny_data, make_resources, instance)
    assert result.success
    return out, result.asset_materializations_for_node("task1_score")[0].metadata


def test_task1_score_is_the_fixed_scorers_valid_auc_in_metadata_and_mlflow(scored):
    from mmctr_assets.defs import scorer

    out, meta = scored
    auc = meta["valid_auc"].value
    assert isinstance(auc, float) and 0.5 < auc <= 1.0  # 500 valid rows: chance is 0.5 +- 0.025
    assert meta["embedding_source"].value == "fused" and meta["scorer_version"].value == scorer.SCORER_VERSION
    fused = pl.read_parquet(out / "item_info_updated.parquet")["item_emb_d128"]
    from mmctr_assets.lib.io import array_fingerprint

    assert meta["table_fingerprint"].value == array_fingerprint(fused.list.to_array(128).to_numpy().astype(np.float32))
    run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.parent / 'mlflow.db'}").get_run(
        meta["mlflow_run_id"].value)
    assert run.data.metrics["best_valid_auc"] == pytest.approx(auc)
    assert run.data.params["table_fingerprint"] == meta["table_fingerprint"].value
    assert run.data.params["model.cross_layers"] == "0"
    assert run.data.params["train.seed"] == str(scorer.SCORER_TRAIN.seed)
    assert run.data.tags["dagster.asset_key"] == "task1_score"


def test_task1_score_same_table_same_score_other_table_other_score(scored, tiny_data, make_resources, instance,
                                                                   tmp_path):
    out = shutil.copytree(scored[0], tmp_path / "outputs")
    again = score(out, tiny_data, make_resources, instance).asset_materializations_for_node("task1_score")[0].metadata
    assert again["table_fingerprint"].value == scored[1]["table_fingerprint"].value
    assert again["valid_auc"].value == scored[1]["valid_auc"].value
    other = score(out, tiny_data, make_resources, instance, "organisers").asset_materializations_for_node(
        "task1_score")[0].metadata
    assert other["table_fingerprint"].value != scored[1]["table_fingerprint"].value
    assert other["valid_auc"].value != scored[1]["valid_auc"].value


def test_task1_score_unknown_source_is_refused_at_launch_with_the_choices(scored, tiny_data, make_resources,
                                                                         instance):
    with pytest.raises(dg.DagsterInvalidConfigError) as refused:
        score(scored[0], tiny_data, make_resources, instance, "clip", raise_on_error=False)
    message = str(refused.value)
    assert "embedding_source" in message and "got clip" in message
    assert "'fused', 'content', 'item2vec', 'organisers'" in message


def test_task1_score_is_not_refreshed_by_automation_or_the_weekly_retrain():
    from mmctr_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    key = dg.AssetKey("task1_score")
    assert graph.get(key).automation_condition is None
    assert graph.get(key).group_name == "task1_embeddings"
    assert key not in defs.resolve_job_def("retrain_job").asset_layer.selected_asset_keys
    assert key in defs.resolve_job_def("full_refresh_job").asset_layer.selected_asset_keys


def test_task1_scorer_accepts_every_level_the_raw_checks_accept(monkeypatch):
    """MMCTR_MAX_LEVEL=11 passes raw_* and dcn_din_model; the fixed scorer must not then refuse level 11."""
    from mmctr_assets.defs.scorer import SCORER_MODEL, scorer_model

    monkeypatch.setenv("MMCTR_MAX_LEVEL", "11")
    assert scorer_model().level_vocab_size == 12
    assert scorer_model().to_dict() | {"level_vocab_size": 0} == SCORER_MODEL.to_dict() | {"level_vocab_size": 0}


def test_clip_from_the_organisers_vectors_feeds_fusion_and_task1_score_reads_item_emb(outputs, tiny_data, instance,
                                                                                      make_resources):
    """clip_embeddings source: precomputed writes every shard without an encoder (same layout: 512-d
    unit vectors, no text-only items), fusion reads it as before; task1_score scores an
    item_emb.parquet column as its item table."""
    resources = make_resources(tiny_data, outputs)
    result = dg.materialize([task1.clip_embeddings, task1.fused_item_embeddings], resources=resources,
                            instance=instance, tags=RANGE,
                            run_config={"ops": {"clip_embeddings": {"config": {"source": "precomputed"}}}})
    assert result.success
    meta = result.asset_materializations_for_node("clip_embeddings")[0].metadata
    assert meta["source"].value == "precomputed" and meta["items"].value == 300
    shards = pl.concat([pl.read_parquet(outputs / "clip_embeddings" / f"shard-{k}.parquet") for k in SHARDS])
    emb = shards.get_column("clip_emb").to_numpy()
    assert sorted(shards["item_id"].to_list()) == list(range(1, 301)) and emb.shape == (300, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not shards["text_only"].any()
    scored = score(outputs, tiny_data, make_resources, instance, "item_emb:item_emb_d128_v3")
    got = scored.asset_materializations_for_node("task1_score")[0].metadata
    assert got["embedding_source"].value == "item_emb:item_emb_d128_v3" and 0.0 < got["valid_auc"].value <= 1.0
    v3 = pl.read_parquet(microlens.table_path(tiny_data, "item_emb"))["item_emb_d128_v3"].list.to_array(128)
    from mmctr_assets.lib.io import array_fingerprint

    table = np.vstack([np.zeros((1, 128), np.float32), v3.to_numpy().astype(np.float32)])
    assert got["table_fingerprint"].value == array_fingerprint(table)
