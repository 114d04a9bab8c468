"""Small pieces every stage's assets share: the CLIP shard partitions, the GPU op tags, the refresh
condition, CPU turns, progress logging, images in metadata, MLflow run tags."""

import base64
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from .. import settings
from ..lib.cores import core_lease

# item i belongs to shard i % MMCTR_CLIP_SHARDS (docs/assets.md: clip_embeddings shards)
clip_shards = dg.StaticPartitionsDefinition([str(i) for i in range(settings.clip_shards())])
OWNERS = ["team:recsys"]
# lets the cold start run the whole graph, all CLIP shards included, as one run (docs/assets.md)
SINGLE_RUN = dg.BackfillPolicy.single_run()
# dagster-k8s gives a step with these op tags a GPU (MMCTR_EXECUTOR=k8s)
GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}
# asset arguments of a step that uses the GPU: one such step per pool slot, a GPU pod on Kubernetes
ON_GPU = {"pool": "gpu", "op_tags": GPU_TAGS}
# asset arguments of a model trained on the fused item table (dcn_din_model, task1_score)
TRAINED_ON_FUSED = {"kinds": {"pytorch", "mlflow"}, "owners": OWNERS, "backfill_policy": SINGLE_RUN, **ON_GPU,
                    "deps": ["fused_item_embeddings", "raw_train", "raw_valid", "raw_item_info", "raw_item_feature"]}
# refresh once after an upstream update, never on data that failed a blocking check
REFRESH_AFTER_UPSTREAM = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()


class ProgressLog:
    """Logs items done, items/s and ETA at most every `every_s` seconds (and at the end); a call with
    `done` 0 (the work starts, or starts over: trainer.train at each epoch and while it waits for
    cores) restarts the clock, so the rate counts only this pass's items."""

    def __init__(self, log, what: str, every_s: float = 10.0):
        self.log, self.what, self.every_s = log, what, every_s
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done <= 0:
            self.start = self.last = now
            return
        if now - self.last < self.every_s and done < total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if rate else float("inf")
        self.log.info(f"{self.what}: {done}/{total} ({done / max(total, 1):.0%}), {rate:.1f}/s, ETA {eta:.0f}s")


def png_metadata(png: bytes, alt: str) -> dg.MetadataValue:
    """A PNG shown inline in the asset's metadata panel."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def run_tags(context: dg.AssetExecutionContext) -> dict[str, str]:
    """MLflow tags that point back to the Dagster run and asset."""
    return {
        "dagster.run_id": context.run.run_id,
        "dagster.asset_key": context.asset_key.to_user_string(),
        "dagster.job": context.job_name or "",
    }


def cpu_cores(log, lock_dir: Path, want: int | None = None, need: int = 1, what: str = "step",
              poll: Callable[[], None] | None = None):
    """Claim cores of this machine for a CPU-heavy step; yields how many it got (>= ``need``).

    Dagster runs independent steps at once (clip_embeddings beside item2vec_embeddings, or steps
    of two runs, of any deployment); each spawning a thread per core oversubscribes the machine.
    So a step leases up to ``want`` free cores (None: all) from the machine-wide lease
    (lib/cores.py), runs with that many threads, and waits only while fewer than ``need`` are free.
    A training inside the block uses the step's cores instead of leasing more. ``poll()`` runs while
    it waits; what it raises ends the wait (a study's spent budget).
    """
    from ..lib.embeddings.clip import available_cpus

    return core_lease(want, need, folder=lock_dir, cores=available_cpus(), on_wait=lambda m: log.info(f"{what}: {m}"),
                      poll=poll)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch intra-op threads = ``n`` for the block (then restored)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)


def launched_config(context: dg.AssetExecutionContext, op_name: str | None = None) -> dict:
    """An op's config as its run was launched (run config ``ops: <op>: config:``), before Dagster fills
    in defaults: what the user typed. This step's own op unless ``op_name``."""
    ops = (context.run.run_config or {}).get("ops") or {}
    return dict((ops.get(op_name or context.op_def.name) or {}).get("config") or {})
