"""Small pieces every stage's assets share: progress logging, images in metadata, run tags."""

import base64
import tempfile
import time
from pathlib import Path

import dagster as dg


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


def log_png_artifact(png: bytes, name: str) -> None:
    """Attach a PNG to the active MLflow run."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(png)
        mlflow.log_artifact(str(path), artifact_path="plots")


def run_tags(context: dg.AssetExecutionContext) -> dict[str, str]:
    """MLflow tags that point back to the Dagster run and asset."""
    return {
        "dagster.run_id": context.run.run_id,
        "dagster.asset_key": context.asset_key.to_user_string(),
        "dagster.job": context.job_name or "",
    }
