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

import mlflow
import polars as pl
import pytest

import dagster as dg
from mmctr_assets.defs import ctr as task2
from mmctr_assets.lib.data import microlens

# small batches: the tiny training table has 2,000 rows
TRAIN = {"batch_size": 128, "epochs": 4, "lr": 2e-3, "seed": 7}


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
    return Path(shutil.copytree(task2_outputs[0], tmp_path / "outputs"))


def model_metadata(result):
    return result.asset_materializations_for_node("dcn_din_model")[0].metadata


def test_model_learns_planted_signal(task2_outputs):
    meta = model_metadata(task2_outputs[1])
    # 500 valid rows: chance is 0.5 +- 0.025. The tiny world's weak item table (300 items, 2,000
    # rows) suits the default model less than medium's (README, dcn_din_model): 0.649 here.
    assert meta["best_valid_auc"].value > 0.6
    assert meta["valid_auc_check"].value == pytest.approx(meta["best_valid_auc"].value, abs=1e-6)
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
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")} | {
        a.path for a in client.list_artifacts(run.info.run_id, "plots")
    }
    assert artifacts == {"model/model.pt", "model/model_config.json", "plots/training_curves.png", "plots/valid_roc.png"}


def test_same_config_same_auc(outputs, tiny_data, make_resources, instance):
    earlier = json.loads((outputs / "dcn_din_model" / "model_config.json").read_text())
    result = dg.materialize(
        [task2.dcn_din_model], resources=make_resources(tiny_data, outputs), instance=instance, run_config=train_config(epochs=2)
    )
    again = model_metadata(result)
    assert again["data_fingerprint"].value == earlier["data_fingerprint"]  # same data, same fingerprint
    with dg.instance_for_test() as other:
        rerun = dg.materialize(
            [task2.dcn_din_model], resources=make_resources(tiny_data, outputs), instance=other, run_config=train_config(epochs=2)
        )
    assert model_metadata(rerun)["best_valid_auc"].value == again["best_valid_auc"].value


def test_predictions_are_keyed_by_test_ids(task2_outputs, tiny_data):
    out, result = task2_outputs
    pred = pl.read_csv(out / "prediction.csv")
    test_ids = pl.read_parquet(microlens.table_path(tiny_data, "test")).get_column("ID")
    assert pred.columns == ["ID", "probability"]
    assert pred.get_column("ID").to_list() == test_ids.to_list()
    p = pred.get_column("probability")
    assert p.is_finite().all() and p.min() >= 0 and p.max() <= 1 and p.std() > 0
    check = next(e.asset_check_evaluation_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION")
    assert check.check_name == "predictions_valid" and check.passed


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
    result = dg.materialize([task2.submission_zip], resources=make_resources(tiny_data, outputs), instance=instance, raise_on_error=False)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "--select '*predictions'" in str(failure.event_specific_data.error)


def test_failed_submission_keeps_previous_zip(outputs, tiny_data, make_resources, instance):
    before = (outputs / "submission.zip").read_bytes()
    (outputs / "prediction.csv").write_text("not,a\nprediction,file\n")
    result = dg.materialize([task2.submission_zip], resources=make_resources(tiny_data, outputs), instance=instance, raise_on_error=False)
    assert not result.success
    assert (outputs / "submission.zip").read_bytes() == before
    assert sorted(p.name for p in outputs.iterdir() if p.name.startswith(".")) == []


def test_unknown_embedding_source_is_a_clear_error(outputs, tiny_data, make_resources, instance):
    result = dg.materialize(
        [task2.dcn_din_model], resources=make_resources(tiny_data, outputs), instance=instance,
        run_config=train_config(embedding_source="clip"), raise_on_error=False,
    )
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "embedding_source must be one of" in str(failure.event_specific_data.error)


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
        uninterrupted = dg.materialize([task2.dcn_din_model], resources=make_resources(tiny_data, reference), instance=inst, run_config=cfg)
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


def test_flat_config_keys_of_earlier_versions_are_refused_with_the_new_shape(outputs, tiny_data, make_resources, instance):
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


@pytest.mark.parametrize("model,message", [
    ({"family": "deepfm"}, "family must be one of ('dcn_din', 'transformer_dcnv2', 'din'), got 'deepfm'"),
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


def test_transformer_family_with_user_embedding_trains_tracks_and_predicts(outputs, tiny_data, make_resources, instance):
    model = {"family": "transformer_dcnv2", "transformer_dim": 16, "last_k": 4, "cross_rank": 8,
             "use_user_embedding": True, "user_buckets": 64, "use_id_embedding": True,
             "embedding_regularizer": 2e-4}
    res = make_resources(tiny_data, outputs)
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
