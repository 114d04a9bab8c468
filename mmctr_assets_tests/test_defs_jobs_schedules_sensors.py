"""Jobs, the retraining schedule, the raw-data sensor and declarative automation, through Dagster's
own test utilities (no runs are executed here: the UI test runs the graph)."""

import datetime
import json
import os

import dagster as dg
import polars as pl
import pytest

from mmctr_assets import settings
from mmctr_assets.definitions import defs
from mmctr_assets.defs import jobs, schedules, sensors
from mmctr_assets.defs.common import clip_shards
from mmctr_assets.lib.data import microlens
from mmctr_assets.lib.io import file_fingerprint
from mmctr_assets.resources import ProjectStorage

SHARDS = clip_shards.get_partition_keys()
DOWNSTREAM = {"fused_item_embeddings", "dcn_din_model", "predictions", "submission_zip"}


def job_assets(name: str) -> set[str]:
    return {k.to_user_string() for k in defs.resolve_job_def(name).asset_layer.selected_asset_keys}


def test_retrain_job_runs_raw_through_submission_without_clip():
    raw = {f"raw_{t}" for t in ("train", "valid", "test", "item_info", "item_feature", "item_emb", "item_images")}
    assert job_assets("retrain_job") == raw | {"item2vec_embeddings"} | DOWNSTREAM
    # the Task 1 scorer trains a second model: the whole graph runs it, the weekly retrain does not
    assert job_assets("full_refresh_job") == job_assets("retrain_job") | {"clip_embeddings", "task1_score"}
    assert defs.resolve_job_def("full_refresh_job").partitions_def.get_partition_keys() == SHARDS
    assert job_assets("clip_shards_job") == {"clip_embeddings"}
    # a tuning study (many trainings) runs only when a person asks for it
    assert job_assets("ctr_tuning_job") == {"ctr_tuning"}


# ----------------------------------------------------------------------------------------------
# schedule


def test_weekly_schedule_requests_one_valid_retrain_run():
    schedule = defs.get_repository_def().get_schedule_def("weekly_retrain")
    assert schedule.cron_schedule == settings.DEFAULT_RETRAIN_CRON == "0 3 * * 1"
    assert schedule.execution_timezone == "UTC"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    assert schedule.job_name == "retrain_job"
    when = datetime.datetime(2026, 3, 2, 3, 0, tzinfo=datetime.timezone.utc)  # a Monday
    requests = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=when)).run_requests
    assert len(requests) == 1
    assert requests[0].tags[jobs.TRIGGER_TAG] == "schedule"
    assert dg.validate_run_config(defs.resolve_job_def("retrain_job"), requests[0].run_config) is not None


def test_schedule_cron_and_timezone_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MMCTR_RETRAIN_CRON", "30 1 * * *")
    monkeypatch.setenv("MMCTR_RETRAIN_TZ", "Asia/Shanghai")
    schedule = schedules.build_retrain_schedule(settings.retrain_cron(), settings.retrain_timezone())
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("30 1 * * *", "Asia/Shanghai")


@pytest.mark.parametrize(
    ("cron", "tz", "variable"),
    [("every monday", "UTC", "MMCTR_RETRAIN_CRON"), ("0 3 * * 1", "Mars/Olympus_Mons", "MMCTR_RETRAIN_TZ")],
)
def test_bad_schedule_settings_name_the_variable_to_fix(cron, tz, variable):
    with pytest.raises(ValueError, match=variable) as err:
        schedules.build_retrain_schedule(cron, tz)
    assert (cron if variable.endswith("CRON") else tz) in str(err.value)


# ----------------------------------------------------------------------------------------------
# raw-data sensor


@pytest.fixture
def sense(data_copy):
    """Evaluate the sensor on a private data copy, threading the cursor like the daemon does."""
    state = {"cursor": None}

    def tick():
        context = dg.build_sensor_context(
            cursor=state["cursor"], resources={"storage": ProjectStorage(data_dir=str(data_copy), output_dir="unused")}
        )
        result = sensors.raw_data_sensor(context)
        state["cursor"] = context.cursor
        return result

    return tick


def requests_of(result) -> list[dg.RunRequest]:
    if isinstance(result, dg.SkipReason):
        return []
    return result if isinstance(result, list) else [result]


def assert_valid(request: dg.RunRequest) -> None:
    job = defs.resolve_job_def(request.job_name)
    assert dg.validate_run_config(job, request.run_config) is not None


def test_first_look_records_fingerprints_and_no_change_starts_nothing(sense, data_copy):
    first = sense()
    assert isinstance(first, dg.SkipReason) and "First look" in first.skip_message
    assert requests_of(sense()) == []
    # a touch (new mtime, same bytes) re-hashes to the same content: still nothing
    train = microlens.table_path(data_copy, "train")
    os.utime(train, ns=(train.stat().st_atime_ns, train.stat().st_mtime_ns + 10**9))
    assert requests_of(sense()) == []


def test_cursor_holds_content_fingerprints(data_copy):
    context = dg.build_sensor_context(
        resources={"storage": ProjectStorage(data_dir=str(data_copy), output_dir="unused")})
    sensors.raw_data_sensor(context)
    cursor = json.loads(context.cursor)
    assert set(cursor) == set(microlens.TABLES) | {"item_images"}
    assert cursor["train"]["content"] == file_fingerprint(microlens.table_path(data_copy, "train"))


def test_changed_interactions_start_exactly_one_retrain_run(sense, data_copy):
    sense()
    train = microlens.table_path(data_copy, "train")
    pl.read_parquet(train).head(-1).write_parquet(train)
    requests = requests_of(sense())
    assert len(requests) == 1
    request = requests[0]
    assert request.job_name == "retrain_job"
    assert request.tags["mmctr/changed_sources"] == "train"
    assert jobs.RANGE_START_TAG not in request.tags  # CLIP shards are reused
    assert_valid(request)
    assert requests_of(sense()) == []  # once per change


@pytest.mark.parametrize("change", ["item_info", "new_cover", "item_feature_removed"])
def test_changed_item_content_refreshes_every_clip_shard_in_one_run(sense, data_copy, change):
    sense()
    if change == "item_info":
        path = microlens.table_path(data_copy, "item_info")
        frame = pl.read_parquet(path)
        frame.with_columns(pl.col("item_tags").list.reverse()).write_parquet(path)
        expected = "item_info"
    elif change == "new_cover":
        images = data_copy / microlens.IMAGES_DIR
        missing = next(i for i in range(1, 10_000) if not (images / f"{i}.jpg").exists())
        (images / f"{missing}.jpg").write_bytes((images / next(images.iterdir()).name).read_bytes())
        expected = "item_images"
    else:
        microlens.table_path(data_copy, "item_feature").unlink()
        expected = "item_feature"
    requests = requests_of(sense())
    assert len(requests) == 1
    request = requests[0]
    assert request.job_name == "full_refresh_job"
    assert request.tags["mmctr/changed_sources"] == expected
    assert (request.tags[jobs.RANGE_START_TAG], request.tags[jobs.RANGE_END_TAG]) == (SHARDS[0], SHARDS[-1])
    assert_valid(request)
    assert requests_of(sense()) == []


def test_sensor_targets_both_jobs_and_starts_stopped():
    sensor = defs.get_repository_def().get_sensor_def("raw_data_sensor")
    assert {t.job_name for t in sensor.targets} == {"retrain_job", "full_refresh_job"}
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED


# ----------------------------------------------------------------------------------------------
# declarative automation


def report_materialized(instance, graph, keys, partition=None):
    for key in keys:
        instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=partition))
        for check in graph.get(dg.AssetKey(key)).check_keys:
            instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(asset_key=check.asset_key, check_name=check.name, passed=True)
            )


def report_everything_materialized(instance):
    """Every asset (every CLIP shard) materialised once with passing checks; returns the graph."""
    graph = defs.resolve_asset_graph()
    for key in graph.toposorted_asset_keys:
        name = key.to_user_string()
        for partition in SHARDS if name == "clip_embeddings" else [None]:
            report_materialized(instance, graph, [name], partition)
    return graph


def requested(result) -> dict[str, set]:
    return {
        r.key.to_user_string(): {ap.partition_key for ap in r.true_subset.expensively_compute_asset_partitions()}
        for r in result.results
        if r.true_subset.size and isinstance(r.key, dg.AssetKey)
    }


def test_nothing_starts_by_itself_on_a_fresh_instance(instance):
    graph = defs.resolve_asset_graph()
    manual = ({"clip_embeddings", "item2vec_embeddings", "task1_score", "ctr_tuning"}
              | {k.to_user_string() for k in jobs.RAW.resolve(graph)})
    assert {k.to_user_string() for k in graph.get_all_asset_keys()
            if graph.get(k).automation_condition is None} == manual
    assert dg.evaluate_automation_conditions(defs=defs, instance=instance).total_requested == 0


def test_one_rematerialised_clip_shard_refreshes_downstream_once_and_no_other_shard(instance):
    graph = report_everything_materialized(instance)
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert result.total_requested == 0  # everything is fresh

    report_materialized(instance, graph, ["clip_embeddings"], partition="2")
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    assert requested(result) == {k: {None} for k in DOWNSTREAM}  # no clip shard, no raw, no item2vec

    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    assert result.total_requested == 0  # once per update


def test_downstream_waits_for_passing_blocking_checks(instance):
    report_everything_materialized(instance)
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    # fused embeddings re-materialised outside automation, and their blocking check failed
    instance.report_runless_asset_event(dg.AssetMaterialization("fused_item_embeddings"))
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(asset_key=dg.AssetKey("fused_item_embeddings"), check_name="item_info_updated_valid",
                                passed=False)
    )
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    assert "dcn_din_model" not in requested(result)


# ----------------------------------------------------------------------------------------------
# executor


@pytest.mark.parametrize(("name", "expected"),
                         [("in_process", dg.in_process_executor), ("multiprocess", dg.multiprocess_executor)])
def test_executor_from_env(monkeypatch, name, expected):
    monkeypatch.setenv("MMCTR_EXECUTOR", name)
    assert jobs.executor_from_env() is expected
    monkeypatch.delenv("MMCTR_EXECUTOR")
    assert jobs.executor_from_env() is None


def test_unknown_or_unavailable_executor_says_what_to_do(monkeypatch):
    monkeypatch.setenv("MMCTR_EXECUTOR", "gpu-cluster")
    with pytest.raises(ValueError, match="MMCTR_EXECUTOR='gpu-cluster' is not one of multiprocess, in_process, k8s"):
        jobs.executor_from_env()
    monkeypatch.setenv("MMCTR_EXECUTOR", "k8s")
    try:
        import dagster_k8s
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install dagster-k8s==0\.29\.\*"):
            jobs.executor_from_env()
    else:
        assert jobs.executor_from_env() is dagster_k8s.k8s_job_executor


def test_progress_log_rates_count_only_the_pass_since_it_restarted(monkeypatch):
    """dcn_din_model's "training steps" line: the trainer restarts it (done 0) at every epoch, so its
    rate and ETA are this epoch's, not the run's since the step began (which earlier epochs,
    evaluation and any wait for cores would drag down)."""
    from mmctr_assets.defs import common

    now = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    lines = []
    log = type("Log", (), {"info": lambda self, message: lines.append(message)})()
    progress = common.ProgressLog(log, "training steps", every_s=30)
    now[0] = 500.0  # a first epoch, its evaluation, a wait
    progress(0, 100)
    now[0] = 540.0
    progress(80, 100)
    assert lines == ["training steps: 80/100 (80%), 2.0/s, ETA 10s"]
