"""Jobs: what runs together, and the executor a deployment runs steps with.

What starts what (docs/operations.md):
- raw_*, clip_embeddings and item2vec_embeddings never start by themselves: a person, the
  schedule or the raw-data sensor asks for them, because they read new data or use the GPU.
- fused_item_embeddings and the Task 2 assets carry `AutomationCondition.eager()`: when something
  upstream updates outside their own run (one re-encoded CLIP shard, say), the automation sensor
  (sensors.py) refreshes them once, without touching the other shards.
- task1_score (the Task 1 scorer) has no automation condition and retrain_job (the weekly
  schedule) leaves it out, so a fused refresh trains one model (dcn_din_model), not two; it runs
  when a person selects it, and in full_refresh_job (the whole graph, e.g. after new raw data).
"""

from __future__ import annotations

import dagster as dg

from .. import settings
from .common import clip_shards
from .raw import GROUP as RAW_GROUP

# The tags `dagster asset materialize --partition-range` sets: all shards in one run.
RANGE_START_TAG, RANGE_END_TAG = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
TRIGGER_TAG = "mmctr/trigger"


def executor_from_env() -> dg.ExecutorDefinition | None:
    """MMCTR_EXECUTOR picks how a run executes its steps; unset keeps Dagster's default
    (a subprocess per step). in_process saves the per-step start-up on small machines; k8s runs
    each step in its own pod, so GPU steps get GPU pods (needs dagster-k8s in the image)."""
    name = settings.executor_name()
    if name is None:
        return None
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


RAW = dg.AssetSelection.groups(RAW_GROUP)
CLIP = dg.AssetSelection.assets("clip_embeddings")
# the Task 1 scorer trains a model: only a full refresh or a person runs it (defs/scorer.py)
SCORER = dg.AssetSelection.assets("task1_score")
# a study of many trainings (defs/tuning.py): it runs when a person asks (ctr_tuning_job), never in a refresh
TUNING = dg.AssetSelection.assets("ctr_tuning")

retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=(RAW | dg.AssetSelection.assets("item2vec_embeddings").downstream()) - SCORER - TUNING,
    description="Fresh raw snapshots, then item2vec -> fused embeddings -> the CTR model (dcn_din_model) -> "
    "predictions -> submission zip. Reuses the CLIP shards on disk (run full_refresh_job when item content changed).",
    tags={TRIGGER_TAG: "manual"},
)

full_refresh_job = dg.define_asset_job(
    "full_refresh_job",
    selection=dg.AssetSelection.all() - TUNING,
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


ctr_tuning_job = dg.define_asset_job(
    "ctr_tuning_job",
    selection=TUNING,
    description="An Optuna study over dcn_din_model's config (docs/tuning.md); then dcn_din_model with "
    "tuned: true trains the best one. Re-launching with the same study name resumes the study.",
    tags={TRIGGER_TAG: "manual"},
)


def all_shards_tags() -> dict[str, str]:
    keys = clip_shards.get_partition_keys()
    return {RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]}



defs = dg.Definitions(jobs=[retrain_job, full_refresh_job, clip_shards_job, ctr_tuning_job],
                      executor=executor_from_env())
