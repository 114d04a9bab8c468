"""Where things live, in one place. Every default can be overridden by an environment variable
(documented in README.md) and, per run, by Dagster resource config."""

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
