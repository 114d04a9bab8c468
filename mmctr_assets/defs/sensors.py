"""Sensors: the raw-data sensor that starts a run when source files change, and the automation
sensor that refreshes downstream assets after a partial update."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg

from ..lib.data.microlens import IMAGES_DIR, TABLES, table_path
from ..lib.io import file_fingerprint
from ..resources import ProjectStorage
from .jobs import TRIGGER_TAG, all_shards_tags, full_refresh_job, retrain_job

RAW_SENSOR_INTERVAL_S = 300

CLIP_SOURCES = frozenset({"item_info", "item_feature", "item_images"})
ABSENT = "absent"


def source_paths(data_dir: str | os.PathLike) -> dict[str, Path]:
    """Every raw input the graph reads: the tables (optional ones too) and the cover-image folder."""
    paths = {t: table_path(data_dir, t) for t in TABLES}
    return paths | {"item_images": Path(data_dir) / IMAGES_DIR}


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
        return file_fingerprint(path)
    if not path.is_dir():
        return ABSENT
    files = sorted((e.path for e in os.scandir(path) if e.is_file()), key=os.path.basename)
    with ThreadPoolExecutor(8) as pool:  # hashing releases the GIL; covers are many small files
        digests = pool.map(file_fingerprint, files)
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



automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates the assets' automation conditions: fused_item_embeddings and the Task 2 "
    "assets refresh once after an upstream asset updates outside their own run. Raw, CLIP and "
    "item2vec have no condition, so starting `dagster dev` never starts them.",
)


defs = dg.Definitions(sensors=[raw_data_sensor, automation_sensor])
