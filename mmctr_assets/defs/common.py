"""Small pieces every stage's assets share: the CLIP shard partitions, the GPU op tags, the refresh
condition, CPU turns, progress logging, images in metadata, MLflow run tags."""

import base64
import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

import dagster as dg

from .. import settings

# item i belongs to shard i % MMCTR_CLIP_SHARDS (README: clip_embeddings shards)
clip_shards = dg.StaticPartitionsDefinition([str(i) for i in range(settings.clip_shards())])
OWNERS = ["team:recsys"]
# lets the cold start run the whole graph, all CLIP shards included, as one run (README.md)
SINGLE_RUN = dg.BackfillPolicy.single_run()
# dagster-k8s gives a step with these op tags a GPU (MMCTR_EXECUTOR=k8s)
GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}
# asset arguments of a step that uses the GPU: one such step per pool slot, a GPU pod on Kubernetes
ON_GPU = {"pool": "gpu", "op_tags": GPU_TAGS}
# refresh once after an upstream update, never on data that failed a blocking check
REFRESH_AFTER_UPSTREAM = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()


class ProgressLog:
    """Logs items done, items/s and ETA at most every `every_s` seconds (and at the end)."""

    def __init__(self, log, what: str, every_s: float = 10.0):
        self.log, self.what, self.every_s = log, what, every_s
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
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


@contextlib.contextmanager
def cpu_turn(context: dg.AssetExecutionContext, lock_dir: Path, threads: int | None = None, heavy: bool = True):
    """Run a CPU-heavy step alone on the CPU, with ``threads`` torch/OpenMP threads (None: unchanged).

    Dagster runs independent steps at once (clip_embeddings beside item2vec_embeddings, or two
    runs); each would spawn a thread per core, and together they oversubscribe the machine (on 2
    cores both ran 2-4x slower than alone). So CPU-heavy steps take turns on an exclusive file lock
    (across steps and runs of this output folder) and each gets every core while it holds it.
    A step on the GPU passes ``heavy=False``: it only sets its threads and does not wait.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    if not heavy:
        try:
            yield
        finally:
            torch.set_num_threads(previous)
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    me = {"run_id": context.run.run_id, "asset": context.asset_key.to_user_string(), "pid": os.getpid()}
    with open(lock_dir / "cpu.lock", "a+") as f:
        t0 = time.perf_counter()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another step"
            context.log.info(f"waiting for the CPU: held by {holder} (CPU-heavy steps take turns; defs/common.py cpu_turn)")
            fcntl.flock(f, fcntl.LOCK_EX)
        waited = time.perf_counter() - t0
        f.seek(0)
        f.truncate()
        f.write(json.dumps(me))
        f.flush()
        if waited > 1:
            context.log.info(f"got the CPU after {waited:.0f}s")
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
            torch.set_num_threads(previous)
