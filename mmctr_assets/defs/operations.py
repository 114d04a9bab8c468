"""Running the platform unattended: jobs, the weekly retraining schedule, the raw-data sensor, the
automation sensor that refreshes downstream assets, and the executor a deployment runs steps with.

What starts what (README.md, "Operating the platform"):
- raw_*, clip_embeddings and item2vec_embeddings never start by themselves: a person, the
  schedule or the raw-data sensor asks for them, because they read new data or use the GPU.
- fused_item_embeddings and the Task 2 assets carry `AutomationCondition.eager()`: when something
  upstream updates outside their own run (one re-encoded CLIP shard, say), the automation sensor
  refreshes them once, without touching the other shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg

from ..lib import dataset
from ..resources import ProjectStorage
from .raw import GROUP as RAW_GROUP
from .task1 import clip_shards

DEFAULT_RETRAIN_CRON = "0 3 * * 1"  # Mondays 03:00
DEFAULT_RETRAIN_TZ = "UTC"
EXECUTORS = ("multiprocess", "in_process", "k8s")
RAW_SENSOR_INTERVAL_S = 300
# The tags `dagster asset materialize --partition-range` sets: all shards in one run.
RANGE_START_TAG, RANGE_END_TAG = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
TRIGGER_TAG = "mmctr/trigger"


# ----------------------------------------------------------------------------------------------
# settings (environment variables, documented in README.md)


def retrain_cron() -> str:
    return os.environ.get("MMCTR_RETRAIN_CRON") or DEFAULT_RETRAIN_CRON


def retrain_timezone() -> str:
    return os.environ.get("MMCTR_RETRAIN_TZ") or DEFAULT_RETRAIN_TZ


def executor_from_env() -> dg.ExecutorDefinition | None:
    """MMCTR_EXECUTOR picks how a run executes its steps; unset keeps Dagster's default
    (a subprocess per step). in_process saves the per-step start-up on small machines; k8s runs
    each step in its own pod, so GPU steps get GPU pods (needs dagster-k8s in the image)."""
    name = (os.environ.get("MMCTR_EXECUTOR") or "").strip().lower()
    if not name:
        return None
    if name not in EXECUTORS:
        raise ValueError(f"MMCTR_EXECUTOR={name!r} is not one of {', '.join(EXECUTORS)} (or unset for Dagster's default).")
    if name == "multiprocess":
        return dg.multiprocess_executor
    if name == "in_process":
        return dg.in_process_executor
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError as exc:
        raise ImportError(
            "MMCTR_EXECUTOR=k8s needs dagster-k8s in the code location's image: "
            "`pip install dagster-k8s==0.29.*` (the release matching dagster 1.13), or unset MMCTR_EXECUTOR."
        ) from exc
    return k8s_job_executor


# ----------------------------------------------------------------------------------------------
# jobs

RAW = dg.AssetSelection.groups(RAW_GROUP)
CLIP = dg.AssetSelection.assets("clip_embeddings")

retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=RAW | dg.AssetSelection.assets("item2vec_embeddings").downstream(),
    description="Fresh raw snapshots, then item2vec -> fused embeddings -> DCN-DIN -> predictions -> "
    "submission zip. Reuses the CLIP shards on disk (run full_refresh_job when item content changed).",
    tags={TRIGGER_TAG: "manual"},
)

full_refresh_job = dg.define_asset_job(
    "full_refresh_job",
    selection=dg.AssetSelection.all(),
    description="The whole graph, every CLIP shard included, as one run: launch it with the tags "
    f"{RANGE_START_TAG}/{RANGE_END_TAG} spanning all shards (the raw-data sensor does).",
    tags={TRIGGER_TAG: "manual"},
)

clip_shards_job = dg.define_asset_job(
    "clip_shards_job",
    selection=CLIP,
    description="CLIP shards only. A job backfill runs one run per shard, so on Kubernetes the shards "
    "fan out over GPU pods (pool 'gpu' caps how many at once); downstream refreshes by automation.",
)


def all_shards_tags() -> dict[str, str]:
    keys = clip_shards.get_partition_keys()
    return {RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]}


# ----------------------------------------------------------------------------------------------
# the weekly retraining


def build_retrain_schedule(cron: str, timezone: str) -> dg.ScheduleDefinition:
    try:
        return dg.ScheduleDefinition(
            name="weekly_retrain",
            job=retrain_job,
            cron_schedule=cron,
            execution_timezone=timezone,
            tags={TRIGGER_TAG: "schedule"},
            description=f"Retrains item2vec through submission_zip on the latest raw data ({cron}, {timezone}).",
            default_status=dg.DefaultScheduleStatus.STOPPED,
        )
    except dg.DagsterInvalidDefinitionError as exc:
        raise ValueError(
            f"Retraining schedule: {exc} Set MMCTR_RETRAIN_CRON to a 5-field cron expression (default "
            f"{DEFAULT_RETRAIN_CRON!r}) and MMCTR_RETRAIN_TZ to an IANA time zone such as 'Europe/Berlin' "
            f"(default {DEFAULT_RETRAIN_TZ!r})."
        ) from exc


# ----------------------------------------------------------------------------------------------
# the raw-data sensor

CLIP_SOURCES = frozenset({"item_info", "item_feature", "item_images"})
ABSENT = "absent"


def source_paths(data_dir: str | os.PathLike) -> dict[str, Path]:
    """Every raw input the graph reads: the five tables and the cover-image folder."""
    paths = {t: dataset.table_path(data_dir, t) for t in dataset.TABLES}
    return paths | {"item_images": Path(data_dir) / dataset.IMAGES_DIR}


def _stat_signature(path: Path) -> str:
    """Cheap signature (sizes, mtimes, names) that changes whenever the content can have changed."""
    if path.is_file():
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    if not path.is_dir():
        return ABSENT
    h = hashlib.blake2b(digest_size=16)
    for entry in sorted((e for e in os.scandir(path) if e.is_file()), key=lambda e: e.name):
        st = entry.stat()
        h.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _content_fingerprint(path: Path) -> str:
    if path.is_file():
        return dataset.file_fingerprint(path)
    if not path.is_dir():
        return ABSENT
    files = sorted((e.path for e in os.scandir(path) if e.is_file()), key=os.path.basename)
    with ThreadPoolExecutor(8) as pool:  # hashing releases the GIL; covers are many small files
        digests = pool.map(dataset.file_fingerprint, files)
        h = hashlib.blake2b(digest_size=16)
        for name, digest in zip(files, digests):
            h.update(f"{os.path.basename(name)}\0{digest}\n".encode())
    return h.hexdigest()


def source_fingerprints(data_dir: str | os.PathLike, previous: dict | None = None) -> dict[str, dict[str, str]]:
    """{source: {"stat": ..., "content": ...}} for every raw input.

    Content is re-hashed only where the stat signature moved since `previous`, so an idle tick
    reads no data; a touched but unchanged file re-hashes to the same content and starts nothing.
    """
    previous = previous or {}
    out = {}
    for name, path in source_paths(data_dir).items():
        stat = _stat_signature(path)
        old = previous.get(name) or {}
        content = old["content"] if old.get("stat") == stat else _content_fingerprint(path)
        out[name] = {"stat": stat, "content": content}
    return out


def changed_sources(previous: dict, current: dict) -> list[str]:
    return sorted(k for k in current if (previous.get(k) or {}).get("content") != current[k]["content"])


def run_request_for_change(changed: list[str]) -> dg.RunRequest:
    """Changed item content (tables or covers) needs new CLIP shards: the whole graph in one run.
    Otherwise only the interaction tables changed: retrain on the CLIP shards already computed."""
    tags = {TRIGGER_TAG: "raw_data_sensor", "mmctr/changed_sources": ",".join(changed)}
    if CLIP_SOURCES.intersection(changed):
        return dg.RunRequest(job_name=full_refresh_job.name, tags=tags | all_shards_tags())
    return dg.RunRequest(job_name=retrain_job.name, tags=tags)


@dg.sensor(
    name="raw_data_sensor",
    jobs=[retrain_job, full_refresh_job],
    minimum_interval_seconds=RAW_SENSOR_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Starts one run per change of the raw data files (content fingerprints in the cursor): "
    "full_refresh_job when item content changed, retrain_job when only interactions did.",
)
def raw_data_sensor(context: dg.SensorEvaluationContext, storage: ProjectStorage):
    previous = json.loads(context.cursor) if context.cursor else None
    current = source_fingerprints(storage.data_dir, previous)
    context.update_cursor(json.dumps(current, sort_keys=True))
    if previous is None:
        return dg.SkipReason(f"First look at {storage.data_dir}: fingerprints recorded; the next change starts a run.")
    changed = changed_sources(previous, current)
    if not changed:
        return dg.SkipReason("No raw data file changed.")
    context.log.info(f"changed sources: {', '.join(changed)}")
    return run_request_for_change(changed)


# ----------------------------------------------------------------------------------------------
# declarative automation

automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates the assets' automation conditions: fused_item_embeddings and the Task 2 "
    "assets refresh once after an upstream asset updates outside their own run. Raw, CLIP and "
    "item2vec have no condition, so starting `dagster dev` never starts them.",
)

defs = dg.Definitions(
    jobs=[retrain_job, full_refresh_job, clip_shards_job],
    schedules=[build_retrain_schedule(retrain_cron(), retrain_timezone())],
    sensors=[raw_data_sensor, automation_sensor],
    executor=executor_from_env(),
)
