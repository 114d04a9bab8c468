"""Every environment variable mmctr reads, in one place (documented in README.md, Configuration).
Where a value is also a resource or asset config field, the variable sets its default and a run
can override it in the launchpad or with `--config`."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _default_state_dir() -> Path:
    # An editable checkout keeps its state beside the code (ignored by git); an installed
    # package falls back to the working directory.
    repo = PACKAGE_DIR.parent
    base = repo if (repo / "pyproject.toml").exists() else Path.cwd()
    return base / ".mmctr"


def state_dir() -> Path:
    return Path(os.environ.get("MMCTR_STATE_DIR") or _default_state_dir()).resolve()


def data_dir() -> Path:
    """Folder that holds MicroLens_1M_x1/, item_feature.parquet and item_images/."""
    return Path(os.environ.get("MMCTR_DATA_DIR") or state_dir() / "demo_data").resolve()


def output_dir() -> Path:
    return Path(os.environ.get("MMCTR_OUTPUT_DIR") or state_dir() / "outputs").resolve()


def mlflow_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow.db'}"


DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


def clip_model() -> str:
    """A hub id or a local directory; the demo points this at the random-weight CLIP it builds."""
    return os.environ.get("MMCTR_CLIP_MODEL") or DEFAULT_CLIP_MODEL


def clip_shards() -> int:
    """Number of item shards of clip_embeddings (item_id % n). Fixed per deployment: changing it
    re-keys every shard, so all shards must be recomputed."""
    return int(os.environ.get("MMCTR_CLIP_SHARDS", "4"))


def seed() -> int:
    return int(os.environ.get("MMCTR_SEED", "42"))


def max_level() -> int:
    """Largest likes/views level the data may hold (the raw checks' bound; the model's level table
    has max_level + 1 rows by default)."""
    return int(os.environ.get("MMCTR_MAX_LEVEL", "10"))


DEFAULT_RETRAIN_CRON = "0 3 * * 1"  # Mondays 03:00
DEFAULT_RETRAIN_TZ = "UTC"


def retrain_cron() -> str:
    return os.environ.get("MMCTR_RETRAIN_CRON") or DEFAULT_RETRAIN_CRON


def retrain_timezone() -> str:
    return os.environ.get("MMCTR_RETRAIN_TZ") or DEFAULT_RETRAIN_TZ


EXECUTORS = ("multiprocess", "in_process", "k8s")


def executor_name() -> str | None:
    """MMCTR_EXECUTOR: how a run executes its steps; None keeps Dagster's default."""
    name = (os.environ.get("MMCTR_EXECUTOR") or "").strip().lower()
    if not name:
        return None
    if name not in EXECUTORS:
        raise ValueError(f"MMCTR_EXECUTOR={name!r} is not one of {', '.join(EXECUTORS)} "
                         "(or unset for Dagster's default).")
    return name
