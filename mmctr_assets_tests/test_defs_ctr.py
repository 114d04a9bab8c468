"""Task 2 assets through Dagster: the model and its MLflow run, predictions, the submission zip."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import polars as pl
import pytest
import torch

from mmctr_assets.defs import ctr as task2
from mmctr_assets.lib.data import microlens
from mmctr_assets.resources import MlflowResource

# small batches: the tiny training table has 2,000 rows. One torch thread, pinned: the same config
# gives the same AUC only with the same thread count, and the free cores of the machine-wide lease
# (what an unset num_threads takes) change with whatever else runs on the machine
TRAIN = {"batch_size": 128, "epochs": 4, "lr": 2e-3, "seed": 7, "num_threads": 1}


def train_config(embedding_source: str = "fused", model: dict | None = None, **train) -> dict:
    config = {"embedding_source": embedding_source, "model": model or {}, "train": TRAIN | train}
    return {"ops": {"dcn_din_model": {"config": config}}}


@pytest.fixture(scope="session")
def task2_outputs(task1_outputs, tiny_data, tmp_path_factory, make_resources):
    out = Path(shutil.copytree(task1_outputs[0], tmp_path_factory.mktemp("task2") / "outputs"))
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [task2.dcn_din_model, task2.predictions, task2.submission_zip],
            resources=make_resources(tiny_data, out),
            instance=instance,
            run_config=train_config(),
        )
        assert result.success
    return out, result


@pytest.fixture
def outputs(task2_outputs, tmp_path) -> Path:
    """A private copy of the session's outputs and of its MLflow database (the registry whose
    champion is the session's model; artifacts stay where the session wrote them: read only)."""
    shutil.copy(task2_outputs[0].parent / "mlflow.db", tmp_path / "mlflow.db")
    return Path(shutil.copytree(task2_outputs[0], tmp_path / "outputs"))


def lenient(resources: dict, tolerance: float = 1.0) -> dict:
    """Resources whose gate promotes any version (tests of training, not of the gate)."""
    mlflow_resource = resources["mlflow"]
    return resources | {"mlflow": MlflowResource(tracking_uri=mlflow_resource.tracking_uri,
                                                  promotion_tolerance=tolerance)}


def model_metadata(result):
    return result.asset_materializations_for_node("dcn_din_model")[0].metadata


def test_model_learns_planted_signal(task2_outputs):
    meta = model_metadata(task2_outputs[1])
    # 500 valid rows: chance is 0.5 +- 0.025. The tiny world's weak item table (300 items, 2,000
    # rows) suits the default model less than medium's (README, dcn_din_model): 0.649 here.
    assert meta["best_valid_auc"].value > 0.6
    check = task2_outputs[1].get_asset_check_evaluations()[0]
    assert check.check_name == "not_worse_than_champion" and check.passed  # the first version is promoted
    assert "first version" in check.description and meta["registered_version"].value == "1"
    assert meta["training_curves"].value.startswith("![") and meta["valid_roc"].value.startswith("![")
    assert (task2_outputs[0] / "dcn_din_model" / "model.pt").exists()
    assert not (task2_outputs[0] / "dcn_din_model" / "checkpoints-fused").exists()


def test_training_run_is_logged_to_mlflow(task2_outputs):
    out, result = task2_outputs
    meta = model_metadata(result)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.parent / 'mlflow.db'}")
    run = client.get_run(meta["mlflow_run_id"].value)
    assert run.data.metrics["best_valid_auc"] == pytest.approx(meta["best_valid_auc"].value)
    assert run.data.params["train.batch_size"] == "128" and run.data.params["embedding_source"] == "fused"
    assert run.data.params["data_fingerprint"] == meta["data_fingerprint"].value
    assert run.data.tags["dagster.run_id"] == result.run_id
    assert run.data.tags["dagster.asset_key"] == "dcn_din_model"
    for metric in ("train_loss", "valid_auc", "valid_logloss", "lr"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert steps == list(range(1, meta["epochs_run"].value + 1)), metric
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/training_curves.png",
                                                                                  "plots/valid_roc.png"}
    # the model is a registered version: signature, config, fingerprints and the Dagster run
    (version,) = client.search_model_versions("name = 'mmctr-ctr'")
    assert version.run_id == run.info.run_id and version.tags["dagster.run_id"] == result.run_id
    assert version.tags["data_fingerprint"] == meta["data_fingerprint"].value
    assert float(version.tags["valid_auc"]) == pytest.approx(meta["best_valid_auc"].value)
    assert json.loads(version.description) == json.loads((out / "dcn_din_model" / "model_config.json").read_text())
    assert client.get_model_version_by_alias("mmctr-ctr", "champion").version == version.version
    info = mlflow.models.get_model_info(f"models:/mmctr-ctr/{version.version}")
    assert "item_seq" in info.signature.inputs.input_names() and info.signature.outputs.input_names() == ["probability"]


def test_same_config_same_auc(outputs, tiny_data, make_resources, instance):
    earlier = json.loads((outputs / "dcn_din_model" / "model_config.json").read_text())
    resources = lenient(make_resources(tiny_data, outputs))
    result = dg.materialize([task2.dcn_din_model], resources=resources, instance=instance,
                            run_config=train_config(epochs=2))
    again = model_metadata(result)
    assert again["data_fingerprint"].value == earlier["data_fingerprint"]  # same data, same fingerprint
    with dg.instance_for_test() as other:
        rerun = dg.materialize([task2.dcn_din_model], resources=resources, instance=other,
                               run_config=train_config(epochs=2))
    assert model_metadata(rerun)["best_valid_auc"].value == again["best_valid_auc"].value


def test_predictions_are_keyed_by_test_ids(task2_outputs, tiny_data):
    out, result = task2_outputs
    pred = pl.read_csv(out / "prediction.csv")
    test_ids = pl.read_parquet(microlens.table_path(tiny_data, "test")).get_column("ID")
    assert pred.columns == ["ID", "probability"]
    assert pred.get_column("ID").to_list() == test_ids.to_list()
    p = pred.get_column("probability")
    assert p.is_finite().all() and p.min() >= 0 and p.max() <= 1 and p.std() > 0
    checks = {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data
              for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert checks["predictions_valid"].passed


def test_submission_zip_holds_exactly_prediction_csv(task2_outputs):
    out, _ = task2_outputs
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert zf.namelist() == ["prediction.csv"]
        with zf.open("prediction.csv") as f:
            frame = pl.read_csv(f)
    assert frame.columns == ["ID", "Task2"]
    assert frame.get_column("ID").equals(pl.read_csv(out / "prediction.csv").get_column("ID"))


def test_submission_column_is_configurable(outputs, tiny_data, make_resources, instance):
    result = dg.materialize(
        [task2.submission_zip], resources=make_resources(tiny_data, outputs), instance=instance,
        run_config={"ops": {"submission_zip": {"config": {"column": "Task1"}}}},
    )
    assert result.success
    with zipfile.ZipFile(outputs / "submission.zip") as zf, zf.open("prediction.csv") as f:
        assert pl.read_csv(f).columns == ["ID", "Task1"]


def test_submission_without_predictions_says_what_to_run(outputs, tiny_data, make_resources, instance):
    (outputs / "prediction.csv").unlink()
    result = dg.materialize([task2.submission_zip], resources=make_resources(tiny_data, outputs), instance=instance,
                            raise_on_error=False)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "--select '*predictions'" in str(failure.event_specific_data.error)


def test_failed_submission_keeps_previous_zip(outputs, tiny_data, make_resources, instance):
    before = (outputs / "submission.zip").read_bytes()
    (outputs / "prediction.csv").write_text("not,a\nprediction,file\n")
    result = dg.materialize([task2.submission_zip], resources=make_resources(tiny_data, outputs), instance=instance,
                            raise_on_error=False)
    assert not result.success
    assert (outputs / "submission.zip").read_bytes() == before
    assert sorted(p.name for p in outputs.iterdir() if p.name.startswith(".")) == []


def test_unknown_embedding_source_is_refused_at_launch_with_the_choices(outputs, tiny_data, make_resources, instance):
    with pytest.raises(dg.DagsterInvalidConfigError,
                       match=r"embedding_source not in enum type "
                             r"Literal\['fused', 'content', 'item2vec', 'organisers', 'item_emb:item_emb_d128_v1', "
                             r"'item_emb:item_emb_d128_v2', 'item_emb:item_emb_d128_v3', 'item_emb:item_emb_d128_e4'\] "
                             r"got clip"):
        dg.materialize([task2.dcn_din_model], resources=make_resources(tiny_data, outputs), instance=instance,
                       run_config=train_config(embedding_source="clip"))
    assert not instance.get_runs()  # nothing started


def _cli(args: list[str], env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "mmctr_assets", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs,
    )


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_result(outputs, tiny_data, tmp_path, make_resources):
    """SIGKILL the CLI mid-training, materialise again: it resumes from the last completed epoch
    and ends exactly where an uninterrupted run ends."""
    cfg = train_config(epochs=6, early_stopping_patience=6, lr_patience=6)
    reference = Path(shutil.copytree(outputs, tmp_path / "reference"))
    with dg.instance_for_test() as inst:
        uninterrupted = dg.materialize([task2.dcn_din_model], resources=make_resources(tiny_data, reference),
                                       instance=inst, run_config=cfg)
    expected = model_metadata(uninterrupted)["best_valid_auc"].value

    home = tmp_path / "home"
    home.mkdir()
    env = os.environ | {
        "DAGSTER_HOME": str(home), "MMCTR_DATA_DIR": str(tiny_data), "MMCTR_OUTPUT_DIR": str(outputs),
        "MMCTR_STATE_DIR": str(tmp_path / "state"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    args = ["--select", "dcn_din_model", "--config-json", json.dumps(cfg)]
    last = outputs / "dcn_din_model" / "checkpoints-fused" / "last.pt"
    proc = _cli(args, env)
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # after epoch 1 is checkpointed, somewhere inside epoch 2
    proc.wait()
    assert last.exists(), proc.stdout.read()[-3000:]

    resumed = _cli(args, env)
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log[-3000:]
    assert "resumed" in log and "started fresh" not in log, log[-3000:]
    instance = dg.DagsterInstance.from_config(str(home))
    event = instance.get_latest_materialization_event(dg.AssetKey("dcn_din_model"))
    meta = event.asset_materialization.metadata
    assert meta["best_valid_auc"].value == expected
    assert meta["epochs_run"].value == model_metadata(uninterrupted)["epochs_run"].value


def test_flat_config_keys_of_earlier_versions_are_refused_with_the_new_shape(outputs, tiny_data, make_resources,
                                                                              instance):
    result = dg.materialize(
        [task2.dcn_din_model], resources=make_resources(tiny_data, outputs), instance=instance,
        run_config={"ops": {"dcn_din_model": {"config": {"epochs": 2, "max_len": 32}}}}, raise_on_error=False,
    )
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error)
    assert "unknown keys ['epochs', 'max_len']" in message
    assert '{"model": {"max_len": "..."}, "train": {"epochs": "..."}}' in message


# ---- issue 9, parts 4 and 5: predictions publish only what passes their check ------------------


def _bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("prediction.csv", "submission.zip", "raw/test.parquet")}


def _failure_message(result, step: str) -> str:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE" and e.step_key == step)
    return failure.event_specific_data.error.message


def test_failed_prediction_check_keeps_the_previous_file(outputs, tiny_data, make_resources, instance):
    before = _bytes(outputs)
    # a test snapshot with a duplicated ID (as one written before raw checks blocked: issue 9)
    test = pl.read_parquet(outputs / "raw" / "test.parquet")
    test.with_columns(ID=pl.when(pl.int_range(pl.len()) == 1).then(test["ID"][0]).otherwise(pl.col("ID"))) \
        .write_parquet(outputs / "raw" / "test.parquet")
    before["raw/test.parquet"] = (outputs / "raw" / "test.parquet").read_bytes()
    result = dg.materialize([task2.predictions, task2.submission_zip], resources=make_resources(tiny_data, outputs),
                            instance=instance, raise_on_error=False)
    assert not result.success
    assert _bytes(outputs) == before
    evaluation = next(e.asset_check_evaluation_data for e in result.all_events
                      if e.event_type_value == "ASSET_CHECK_EVALUATION")
    assert evaluation.check_name == "predictions_valid" and not evaluation.passed
    assert "1 duplicated IDs" in evaluation.description
    assert not result.asset_materializations_for_node("predictions")
    assert "predictions was NOT materialised" in _failure_message(result, "predictions")
    assert not [p for p in outputs.iterdir() if p.name.startswith(".")]  # no temp file left


def test_empty_test_table_is_blocked_at_raw_test(outputs, data_copy, make_resources, instance):
    from mmctr_assets.defs.raw import raw_assets

    raw_test = next(a for a in raw_assets if a.key == dg.AssetKey("raw_test"))
    path = microlens.table_path(data_copy, "test")
    pl.read_parquet(path).clear().write_parquet(path)
    before = _bytes(outputs)
    result = dg.materialize([raw_test, task2.predictions, task2.submission_zip],
                            resources=make_resources(data_copy, outputs), instance=instance, raise_on_error=False)
    assert not result.success
    assert _bytes(outputs) == before  # prediction.csv, the zip and the test snapshot untouched
    assert "test.parquet has 0 rows" in _failure_message(result, "raw_test")
    started = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    assert started == {"raw_test"}  # predictions and the zip never ran


# ---- issue 9, part 6: reproducible end to end --------------------------------------------------------


@pytest.mark.float_repro
def test_two_cold_runs_give_the_same_fused_table_and_auc(task2_outputs, tiny_data, tiny_clip_dir, tmp_path,
                                                         make_resources):
    """A second cold run, in a fresh output folder and instance, of everything up to the model
    (default configs: item2vec with one worker) gives the same bytes and the same AUC."""
    from conftest import RANGE, clip_config

    from mmctr_assets.defs import embeddings as task1
    from mmctr_assets.defs.raw import raw_assets

    first_out, first = task2_outputs
    out = tmp_path / "cold" / "outputs"
    resources = make_resources(tiny_data, out)
    with dg.instance_for_test() as instance:
        assert dg.materialize(raw_assets, resources=resources, instance=instance).success
        result = dg.materialize(
            [task1.clip_embeddings, task1.item2vec_embeddings, task1.fused_item_embeddings, task2.dcn_din_model],
            resources=resources, instance=instance, tags=RANGE,
            run_config={"ops": clip_config(tiny_clip_dir)["ops"] | train_config()["ops"]},
        )
        assert result.success
    assert result.asset_materializations_for_node("item2vec_embeddings")[0].metadata["deterministic"].value
    for name in ("item2vec_embeddings/embeddings.parquet", "item_info_updated.parquet"):
        assert (out / name).read_bytes() == (first_out / name).read_bytes(), name
    assert model_metadata(result)["best_valid_auc"].value == model_metadata(first)["best_valid_auc"].value


def _failure(result) -> str:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return str(failure.event_specific_data.error)


def test_unknown_family_is_refused_at_launch(outputs, tiny_data, make_resources, instance):
    with pytest.raises(dg.DagsterInvalidConfigError, match=r"family not in enum type Literal\['dcn_din', "
                                                            r"'transformer_dcnv2', 'din'\] got deepfm"):
        dg.materialize([task2.dcn_din_model], resources=make_resources(tiny_data, outputs), instance=instance,
                       run_config=train_config(model={"family": "deepfm"}))


@pytest.mark.parametrize("model,message", [
    ({"family": "din", "position": "key"}, "position for family 'din' must be one of ['none'], got 'key'"),
    ({"family": "din", "cross_layers": 2}, "cross_layers is not an option of family 'din'"),
    ({"use_user_embedding": True, "user_buckets": 0}, "user_buckets must be >= 1, got 0"),
    ({"max_len": 21}, "model.max_len=21 is longer than the training histories (20 positions in raw_train's "
                      "item_seq); allowed: 1..20"),
])
def test_bad_model_config_fails_before_training_naming_field_and_allowed_values(
        outputs, tiny_data, make_resources, instance, model, message):
    result = dg.materialize(
        [task2.dcn_din_model], resources=make_resources(tiny_data, outputs), instance=instance,
        run_config=train_config(model=model), raise_on_error=False,
    )
    assert message in _failure(result)
    assert "section model" in _failure(result) or "max_len" in message
    assert not (outputs / "dcn_din_model" / "checkpoints-fused").exists()  # no training started


def test_transformer_family_with_user_embedding_trains_tracks_and_predicts(outputs, tiny_data, make_resources,
                                                                            instance):
    model = {"family": "transformer_dcnv2", "transformer_dim": 16, "last_k": 4, "cross_rank": 8,
             "use_user_embedding": True, "user_buckets": 64, "use_id_embedding": True,
             "embedding_regularizer": 2e-4}
    res = lenient(make_resources(tiny_data, outputs))
    result = dg.materialize([task2.dcn_din_model, task2.predictions], resources=res, instance=instance,
                            run_config=train_config(model=model, epochs=2))
    meta = model_metadata(result)
    assert meta["family"].value == "transformer_dcnv2" and meta["best_valid_auc"].value > 0.5
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{outputs.parent / 'mlflow.db'}")
    run = client.get_run(meta["mlflow_run_id"].value)
    assert run.data.tags["family"] == "transformer_dcnv2" and run.info.run_name == "transformer_dcnv2_fused"
    assert run.data.params["model.max_len"] == "20"  # unset: the data's full history width
    assert run.data.params["model.use_user_embedding"] == "True"
    pred = pl.read_csv(outputs / "prediction.csv")
    assert pred.height == pl.read_parquet(microlens.table_path(tiny_data, "test")).height
    assert pred.get_column("probability").is_between(0, 1).all()


# ---- issue 20: champion / challenger -------------------------------------------------------------

TASK2 = [task2.dcn_din_model, task2.predictions, task2.submission_zip]
SERVED = ("dcn_din_model/model.pt", "dcn_din_model/model_config.json", "prediction.csv", "submission.zip")


def _served(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in SERVED}


def _check(result) -> "dg.AssetCheckEvaluation":
    return next(e.asset_check_evaluation_data for e in result.all_events
                if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.asset_check_evaluation_data.check_name
                == "not_worse_than_champion")


def _registry(uri: str):
    from mmctr_assets.lib.ctr.registry import Registry

    return Registry(uri, "mmctr-ctr")


def test_worse_model_stays_a_challenger_and_the_champion_keeps_serving_byte_for_byte(outputs, tiny_data,
                                                                                      make_resources, instance):
    before = _served(outputs)
    train = outputs / "raw" / "train.parquet"  # a bad week: the labels no longer belong to their rows
    pl.read_parquet(train).with_columns(pl.col("label").shuffle(seed=0)).write_parquet(train)
    resources = make_resources(tiny_data, outputs)
    result = dg.materialize(TASK2, resources=resources, instance=instance, run_config=train_config(),
                            raise_on_error=False)
    assert not result.success
    check = _check(result)
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert "version 2 -> alias challenger" in check.description and "significantly worse: refused" in check.description
    assert check.metadata["p_value_worse"].value < 0.05 and check.metadata["auc_diff_ci_high"].value < -0.001
    assert not result.asset_materializations_for_node("dcn_din_model")
    assert {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"} == {"dcn_din_model"}
    message = _failure_message(result, "dcn_din_model")
    assert "dcn_din_model was NOT materialised" in message
    # only the model was worse: no "until the input is fixed", but who serves and how to override (issue 29)
    assert "The champion (version 1) keeps serving predictions and the submission; nothing downstream is " \
        "blocked. To serve version 2 anyway: `mmctr-model promote 2`." in message
    assert "until the input is fixed" not in message
    assert _served(outputs) == before  # model, its config, prediction.csv, the zip
    registry = _registry(resources["mlflow"].tracking_uri)
    assert str(registry.champion().version) == "1"
    assert str(registry.client.get_model_version_by_alias("mmctr-ctr", "challenger").version) == "2"
    # the paired test's figures are in the training's MLflow run too
    run = registry.client.get_run(registry.client.get_model_version("mmctr-ctr", "2").run_id)
    assert run.data.metrics["gate_p_value_worse"] == pytest.approx(check.metadata["p_value_worse"].value)
    assert run.data.metrics["gate_auc_diff"] == pytest.approx(check.metadata["auc_diff"].value)
    assert "significantly worse: refused" in run.data.tags["gate"]
    # the UI's view: the failed check is recorded on the asset
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("dcn_din_model"), "not_worse_than_champion")])
    assert not next(iter(record.values())).event.asset_check_evaluation.passed
    # predictions and the zip on their own still serve the champion, byte for byte
    again = dg.materialize(TASK2[1:], resources=resources, instance=instance)
    assert _served(outputs) == before
    meta = again.asset_materializations_for_node("predictions")[0].metadata
    assert meta["model_version"].value == "1" and meta["model_uri"].value == "models:/mmctr-ctr@champion"


def test_better_model_is_promoted_and_rollback_serves_the_previous_champion_again(outputs, tiny_data, make_resources,
                                                                                  tmp_path, instance):
    from mmctr_assets.lib.ctr import registry_cli

    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"  # a registry whose first champion is weak
    (outputs / "dcn_din_model" / "model.pt").unlink()  # a new registry: the old one's model moves away first
    resources = make_resources(tiny_data, outputs, uri)
    weak = dg.materialize(TASK2, resources=resources, instance=instance, run_config=train_config(epochs=1, lr=1e-5))
    weak_served = _served(outputs)
    good = dg.materialize(TASK2, resources=resources, instance=instance, run_config=train_config())
    assert _check(good).passed and "version 2 -> alias champion" in _check(good).description
    assert model_metadata(good)["best_valid_auc"].value > model_metadata(weak)["best_valid_auc"].value
    assert _served(outputs)["prediction.csv"] != weak_served["prediction.csv"]
    assert good.asset_materializations_for_node("predictions")[0].metadata["model_version"].value == "2"

    cli = ["--tracking-uri", uri, "--output-dir", str(outputs)]
    assert registry_cli.main(cli + ["rollback"]) == 0
    assert str(_registry(uri).champion().version) == "1"
    again = dg.materialize(TASK2[1:], resources=resources, instance=instance)
    assert again.asset_materializations_for_node("predictions")[0].metadata["model_version"].value == "1"
    for name in ("prediction.csv", "submission.zip"):  # the weak champion's files, read from the registry
        assert (outputs / name).read_bytes() == weak_served[name], name

    # item tables changed since version 2 was trained: promoting it back is refused
    item_info = outputs / "raw" / "item_info.parquet"
    pl.read_parquet(item_info).write_parquet(item_info, compression="gzip")
    assert registry_cli.main(cli + ["promote", "2"]) == 2
    assert str(_registry(uri).champion().version) == "1"


def test_unreachable_registry_fails_before_training_and_overwrites_nothing(outputs, tiny_data, make_resources,
                                                                           instance):
    from pg_server import free_port

    before = _served(outputs)
    uri = f"http://127.0.0.1:{free_port()}"
    result = dg.materialize(TASK2, resources=make_resources(tiny_data, outputs, uri), instance=instance,
                            run_config=train_config(), raise_on_error=False)
    message = _failure(result)
    assert f"MLflow tracking server {uri} does not answer {uri}/api/2.0/mlflow/registered-models/search" in message
    assert "nothing was trained or overwritten" in message
    assert not any("epoch 1" in (e.user_message or "") for e in instance.all_logs(result.run_id))
    assert not (outputs / "dcn_din_model" / "checkpoints-fused").exists()
    assert _served(outputs) == before


def test_champion_whose_files_are_missing_says_how_to_fix(outputs, tiny_data, make_resources, tmp_path, instance):
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    (outputs / "dcn_din_model" / "model.pt").unlink()  # a new registry: the old one's model moves away first
    resources = make_resources(tiny_data, outputs, uri)
    assert dg.materialize([task2.dcn_din_model], resources=resources, instance=instance,
                          run_config=train_config(epochs=1)).success
    champion = _registry(uri).champion()
    (outputs / "dcn_din_model" / "model.pt").unlink()  # the local copy and the registry's files are gone
    stored = _registry(uri).client.get_logged_model(champion.source.removeprefix("models:/")).artifact_location
    shutil.rmtree(stored.removeprefix("file://"))
    before = {n: (outputs / n).read_bytes() for n in ("prediction.csv", "submission.zip")}
    result = dg.materialize(TASK2[1:], resources=resources, instance=instance, raise_on_error=False)
    message = _failure(result)
    assert f"mmctr-ctr version {champion.version} (alias champion" in message and "no readable model.pt" in message
    assert "Fix: `mmctr-model rollback`" in message and "materialise dcn_din_model" in message
    assert {n: (outputs / n).read_bytes() for n in before} == before


# ---- issue 19 part 3, issue 22 item 4: typed configs ----------------------------------------------


@pytest.mark.parametrize("column", ["", "ID"])
def test_bad_submission_column_is_refused_at_launch_and_the_zip_is_unchanged(outputs, tiny_data, make_resources,
                                                                               instance, column):
    before = (outputs / "submission.zip").read_bytes()
    with pytest.raises(dg.DagsterInvalidConfigError,
                       match=rf"column not in enum type Literal\['Task2', 'Task1'\] got {column}"):
        dg.materialize([task2.submission_zip], resources=make_resources(tiny_data, outputs), instance=instance,
                       run_config={"ops": {"submission_zip": {"config": {"column": column}}}})
    assert (outputs / "submission.zip").read_bytes() == before
    assert not instance.get_runs()


def test_config_fields_carry_descriptions_to_the_launchpad():
    from mmctr_assets.defs import scorer

    def fields(asset):
        return asset.op.config_schema.as_field().config_type.fields

    dcn = fields(task2.dcn_din_model)
    assert "fused (Task 1's deliverable)" in dcn["embedding_source"].description
    assert "transformer_dcnv2 (default)" in dcn["model"].config_type.fields["family"].description
    # the asset keeps its name, but its help names the real default family (issue 30)
    assert "Transformer + DCN-V2" in dcn["model"].description and "DCN-DIN" not in task2.dcn_din_model.op.description
    assert "item_feature" in dcn["model"].config_type.fields["use_item_levels"].description
    assert "learning rate" in dcn["train"].config_type.fields["lr"].description
    assert all(f.description for f in dcn["train"].config_type.fields.values())
    assert all(f.description for f in dcn["model"].config_type.fields.values())
    assert "Task2 for a CTR submission" in fields(task2.submission_zip)["column"].description
    assert fields(scorer.task1_score)["embedding_source"].description == dcn["embedding_source"].description


# ---- issue 29: nothing stale (defs/freshness.py), the gate holds, failures name their cause ----------


def _sha256s(out: Path) -> dict[str, str]:
    """Every output file and the MLflow store beside them, by content."""
    import hashlib

    files = [p for p in sorted(out.rglob("*")) if p.is_file()] + [out.parent / "mlflow.db"]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _raw(table: str):
    from mmctr_assets.defs.raw import raw_assets

    return next(a for a in raw_assets if a.key == dg.AssetKey(f"raw_{table}"))


def test_training_refuses_while_raw_train_failed_for_a_missing_column(outputs, data_copy, make_resources, instance):
    resources = make_resources(data_copy, outputs)
    path = microlens.table_path(data_copy, "train")
    pl.read_parquet(path).drop("likes_level").write_parquet(path)
    failed = dg.materialize([_raw("train")], resources=resources, instance=instance, raise_on_error=False)
    assert not failed.success  # failed before its checks ran: they stay planned
    before = _sha256s(outputs)
    result = dg.materialize([task2.dcn_din_model], resources=resources, instance=instance, run_config=train_config(),
                            raise_on_error=False)
    message = _failure_message(result, "dcn_din_model")
    assert f"dcn_din_model did not run: the latest materialisation of raw_train (run {failed.run_id[:8]} failure" \
        in message
    assert "repair the input, and materialise raw_train again" in message and "allow_stale_upstream: true" in message
    assert not result.asset_materializations_for_node("dcn_din_model")
    assert _sha256s(outputs) == before  # model, predictions, zip, snapshots and the MLflow store: no new run
    assert not any("epoch 1" in (e.user_message or "") for e in instance.all_logs(result.run_id))


def test_serving_refuses_while_raw_test_was_refused_and_runs_again_once_it_is_fixed(outputs, data_copy,
                                                                                     make_resources, instance):
    from mmctr_assets.defs.raw import raw_assets

    resources = make_resources(data_copy, outputs)
    path = microlens.table_path(data_copy, "test")
    good = pl.read_parquet(path)
    good.with_columns(ID=pl.when(pl.int_range(pl.len()) == 1).then(good["ID"][0]).otherwise(pl.col("ID"))) \
        .write_parquet(path)
    refused = dg.materialize([_raw("test")], resources=resources, instance=instance, raise_on_error=False)
    assert not refused.success
    before = _sha256s(outputs)
    result = dg.materialize(TASK2[1:], resources=resources, instance=instance, raise_on_error=False)
    assert f"raw_test (run {refused.run_id[:8]} failure" in _failure_message(result, "predictions")
    assert {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"} == {"predictions"}
    # the zip alone: its input predictions last failed, and raw_test before it
    everything = [*raw_assets, *TASK2]
    alone = dg.materialize(everything, selection=["submission_zip"], resources=resources, instance=instance,
                           raise_on_error=False)
    message = _failure_message(alone, "submission_zip")
    assert f"raw_test (run {refused.run_id[:8]}" in message and f"predictions (run {result.run_id[:8]}" in message
    assert "dg launch --assets raw_test,predictions" in message
    assert _sha256s(outputs) == before
    # repaired: the input and everything after it in one run serve again
    good.write_parquet(path)
    again = dg.materialize(everything, selection=["raw_test", "predictions", "submission_zip"], resources=resources,
                           instance=instance)
    assert again.asset_materializations_for_node("submission_zip")


def test_no_champion_alias_means_no_automatic_promotion(outputs, tiny_data, make_resources, instance, capsys):
    from mmctr_assets.lib.ctr import registry_cli

    resources = lenient(make_resources(tiny_data, outputs))  # any version would pass the AUC comparison
    uri = resources["mlflow"].tracking_uri
    _registry(uri).client.delete_registered_model_alias("mmctr-ctr", "champion")
    before = _served(outputs)
    result = dg.materialize([task2.dcn_din_model], resources=resources, instance=instance,
                            run_config=train_config(epochs=1), raise_on_error=False)
    check = _check(result)
    assert not check.passed
    assert "has versions 1 but none holds the alias 'champion'" in check.description
    assert "`mmctr-model promote 2`" in check.description
    message = _failure_message(result, "dcn_din_model")
    assert "No version serves until one is promoted. To serve version 2 anyway: `mmctr-model promote 2`" in message
    assert "until the input is fixed" not in message
    assert _served(outputs) == before and _registry(uri).champion() is None
    # predictions says how to choose one; mmctr-model list shows the state
    served = dg.materialize(TASK2[1:], resources=resources, instance=instance, raise_on_error=False)
    assert "`mmctr-model promote VERSION`" in _failure(served)
    assert registry_cli.main(["--tracking-uri", uri, "--output-dir", str(outputs), "list"]) == 0
    listing = capsys.readouterr().out
    assert "champion: none" in listing and "challenger: version 2" in listing and "model.pt: version 1" in listing
    assert _served(outputs) == before


def test_predictions_refuse_a_missing_or_locked_store_without_creating_one(outputs, tiny_data, make_resources,
                                                                            instance, tmp_path):
    import sqlite3

    before = _served(outputs)
    missing = tmp_path / "elsewhere" / "mlflow.db"
    result = dg.materialize(TASK2[1:], resources=make_resources(tiny_data, outputs, f"sqlite:///{missing}"),
                            instance=instance, raise_on_error=False)
    assert f"MLflow store {missing} does not exist" in _failure(result) and "it was not created" in _failure(result)
    assert not missing.parent.exists()
    # dcn_din_model too, when model.pt came from a store that is gone (the first version would be promoted)
    trained = dg.materialize([task2.dcn_din_model], resources=make_resources(tiny_data, outputs, f"sqlite:///{missing}"),
                             instance=instance, run_config=train_config(epochs=1), raise_on_error=False)
    assert f"MLflow store {missing} does not exist" in _failure(trained) and not missing.parent.exists()
    holder = sqlite3.connect(tmp_path / "mlflow.db")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        locked = dg.materialize(TASK2[1:], resources=make_resources(tiny_data, outputs), instance=instance,
                                raise_on_error=False)
    finally:
        holder.rollback()
        holder.close()
    message = _failure(locked)
    assert "database is locked" in message and "holds a write lock on this sqlite store" in message
    error = next(e for e in locked.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data.error
    assert error.cause.cls_name == "RegistryUnavailable"  # one clear error, not SQLAlchemy's frames
    assert error.cause.cause is None and len(error.cause.stack) < 20
    assert _served(outputs) == before


# ---- issue 31: a preset means what its file says ------------------------------------------------


def test_every_shipped_preset_trains_through_the_asset_as_the_library_resolves_it(outputs, tiny_data,
                                                                                 make_resources, instance):
    """Each preset file, launched as users launch it (its YAML as the run config, one epoch), trains the
    ModelConfig/TrainConfig that `presets.preset(name)` resolves to in the library (what bench_quality
    and docs/results.md measure): a field the file leaves out is the library default, never another
    preset's."""
    import dataclasses

    import yaml

    from mmctr_assets import settings
    from mmctr_assets.lib.ctr import presets
    from mmctr_assets.lib.ctr.model_config import ModelConfig
    from mmctr_assets.lib.ctr.trainer import TrainConfig

    width = 20  # the tiny data's history width: a preset reading more (qin_recipe's 64) reads all 20
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{outputs.parent / 'mlflow.db'}")
    res = lenient(make_resources(tiny_data, outputs))
    assert {"default", "dcn_din", "din", "transformer_dcnv2", "momo", "qin_recipe"} <= set(presets.PRESETS)
    for name in sorted(presets.PRESETS):
        run_config = yaml.safe_load(presets.preset_file(name).read_text())
        section = run_config["ops"]["dcn_din_model"]["config"]
        section["train"] = (section.get("train") or {}) | {"epochs": 1}
        if (section.get("model") or {}).get("max_len", 0) > width:
            section["model"]["max_len"] = width
        result = dg.materialize([task2.dcn_din_model], resources=res, instance=instance, run_config=run_config)
        assert result.success, name
        params = client.get_run(model_metadata(result)["mlflow_run_id"].value).data.params
        library = presets.preset(name)
        model = ModelConfig(**({"max_len": width, "embedding_dim": 128, "level_vocab_size": settings.max_level() + 1}
                               | library["model"] | {"max_len": min(library["model"].get("max_len", width), width)}))
        train = TrainConfig(**({"seed": settings.seed()} | library["train"] | {"epochs": 1}))
        assert {k: params[f"model.{k}"] for k in model.to_dict()} == {
            k: str(v) for k, v in model.to_dict().items()}, name
        assert {k: params[f"train.{k}"] for k in train.to_dict()} == {
            k: str(v) for k, v in dataclasses.asdict(train).items()}, name


# ---- issue 30: leak-free statistics features ------------------------------------------------------


def test_statistics_features_train_through_the_asset_and_serve_as_they_were_validated(outputs, tiny_data,
                                                                                     make_resources, instance):
    """`use_statistics_features` set in the run config: the model trains, records the option in MLflow,
    and the file it is served from scores the validation rows as the training run did (the model file
    carries the training rows' statistics), while `predictions` writes test rows from that same file."""
    import numpy as np

    from mmctr_assets.lib.ctr import artifacts, inference, tensors
    from mmctr_assets.lib.metrics import auc

    model = {"use_statistics_features": True, "statistics_prior_strength": 5.0}
    res = lenient(make_resources(tiny_data, outputs))
    result = dg.materialize([task2.dcn_din_model, task2.predictions], resources=res, instance=instance,
                            run_config=train_config(model=model, epochs=2))
    assert result.success
    meta = model_metadata(result)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{outputs.parent / 'mlflow.db'}")
    params = client.get_run(meta["mlflow_run_id"].value).data.params
    assert params["model.use_statistics_features"] == "True" and params["model.statistics_prior_strength"] == "5.0"
    served = artifacts.load_model(outputs / "dcn_din_model" / "model.pt")
    assert served.config.use_statistics_features and served.statistics.n_users > 0
    valid = pl.read_parquet(microlens.table_path(tiny_data, "valid"))
    probs = inference.predict(served, tensors.to_tensors(valid, served.config.max_len, n_items=served.n_items),
                              batch_size=4096)
    # the training run's best valid AUC, recomputed from the served file: an AUC ranks, so only a
    # reordering of two rows by thread-count rounding could move it
    assert auc(valid.get_column("label").to_numpy(), probs) == pytest.approx(meta["best_valid_auc"].value, abs=1e-3)
    pred = pl.read_csv(outputs / "prediction.csv")
    test = pl.read_parquet(microlens.table_path(tiny_data, "test"))
    want = inference.predict(served, tensors.to_tensors(test, served.config.max_len, n_items=served.n_items))
    assert pred.get_column("ID").to_list() == test.get_column("ID").to_list()
    np.testing.assert_allclose(pred.get_column("probability").to_numpy(), want, rtol=1e-5, atol=1e-6)


# ---- issue 30: model inputs in one place; item-level likes/views levels -------------------------

def test_item_levels_option_trains_through_the_asset_reads_its_inputs_from_the_assembly_and_serves(
        outputs, tiny_data, make_resources, instance, task2_outputs):
    from mmctr_assets.defs.training import read_model_inputs
    from mmctr_assets.lib.ctr import artifacts
    from mmctr_assets.lib.ctr.model_config import ModelConfig

    res = lenient(make_resources(tiny_data, outputs))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{outputs.parent / 'mlflow.db'}")
    inputs = read_model_inputs(res["storage"], "fused", seed=TRAIN["seed"])
    # the session's default model trained on exactly the assembly's inputs (same fingerprint)
    default_run = client.get_run(model_metadata(task2_outputs[1])["mlflow_run_id"].value)
    assert default_run.data.params["data_fingerprint"] == inputs.fingerprints.run
    result = dg.materialize([task2.dcn_din_model, task2.predictions], resources=res, instance=instance,
                            run_config=train_config(model={"use_item_levels": True}, epochs=1))
    assert result.success
    run = client.get_run(model_metadata(result)["mlflow_run_id"].value)
    assert run.data.params["model.use_item_levels"] == "True"
    with_levels = ModelConfig(max_len=inputs.history_width, use_item_levels=True)
    assert run.data.params["data_fingerprint"] == inputs.fingerprints_for(with_levels).run != inputs.fingerprints.run
    model = artifacts.load_model(outputs / "dcn_din_model" / "model.pt")  # promoted: the served model
    assert model.config.use_item_levels and torch.equal(model.item_levels.cpu(), torch.as_tensor(inputs.item_levels))
    pred = pl.read_csv(outputs / "prediction.csv")
    assert pred.height == pl.read_parquet(microlens.table_path(tiny_data, "test")).height
    assert pred.get_column("probability").is_between(0, 1).all()


def test_item_emb_source_without_the_file_names_it_and_what_to_do(outputs, data_copy, make_resources, instance):
    from mmctr_assets.defs.raw import raw_assets

    missing = microlens.table_path(data_copy, "item_emb")
    missing.unlink()  # optional in the download: raw_item_emb writes an empty snapshot
    res = lenient(make_resources(data_copy, outputs))
    raw_item_emb = next(a for a in raw_assets if a.key.to_user_string() == "raw_item_emb")
    assert dg.materialize([raw_item_emb], resources=res, instance=instance).success
    result = dg.materialize([task2.dcn_din_model], resources=res, instance=instance, raise_on_error=False,
                            run_config=train_config("item_emb:item_emb_d128_v3"))
    assert not result.success
    message = str(result.failure_data_for_node("dcn_din_model").error)
    assert "item_emb.parquet" in message and str(missing) in message
    assert "materialise raw_item_emb" in message
    assert {"raw_item_emb", "raw_item_feature"} <= {k.to_user_string() for k in task2.dcn_din_model.dependency_keys}


def _null_levels(data: Path, table: str, rows: list[int]) -> pl.DataFrame:
    path = microlens.table_path(data, table)
    frame = pl.read_parquet(path)
    mask = pl.Series(np.isin(np.arange(frame.height), rows))
    damaged = frame.with_columns(pl.when(mask).then(None).otherwise(pl.col(c)).alias(c)
                                 for c in ("likes_level", "views_level"))
    damaged.write_parquet(path)
    return frame


def test_null_row_levels_are_filled_from_the_item_levels_in_training_and_serving(outputs, data_copy, make_resources,
                                                                                instance):
    from mmctr_assets.defs.raw import raw_assets
    from mmctr_assets.defs.training import read_model_inputs

    original = {t: _null_levels(data_copy, t, [0, 5, 7]) for t in ("train", "test")}
    res = lenient(make_resources(data_copy, outputs))
    raw = [a for a in raw_assets if a.key.to_user_string() in ("raw_train", "raw_test")]
    result = dg.materialize(raw, resources=res, instance=instance)  # the nulls pass: item_feature has levels
    checks = {e.asset_check_evaluation_data.asset_check_key.to_user_string(): e.asset_check_evaluation_data
              for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert checks["raw_train:levels_in_range"].passed
    assert checks["raw_train:levels_in_range"].metadata["filled_from_items"].value == {"likes_level": 3,
                                                                                     "views_level": 3}
    inputs = read_model_inputs(res["storage"], "organisers", seed=TRAIN["seed"])
    # the demo's row levels are its target item's levels: the filled frame is the original one
    assert inputs.frames["train"].equals(original["train"])
    result = dg.materialize([task2.dcn_din_model, task2.predictions], resources=res, instance=instance,
                            run_config=train_config("organisers", epochs=1))
    assert result.success
    assert pl.read_csv(outputs / "prediction.csv").height == original["test"].height
    # without per-item levels a null row level is refused at the raw check, as before
    feature = microlens.table_path(data_copy, "item_feature")
    pl.read_parquet(feature).drop("likes_level", "views_level").write_parquet(feature)
    result = dg.materialize(raw[:1], resources=res, instance=instance, raise_on_error=False)
    assert not result.success
