"""Named run configs for dcn_din_model: one YAML file each under ``mmctr_assets/deploy/presets/``.

Each file is a Dagster run-config fragment (``ops: dcn_din_model: config: model: ... train: ...``),
so the file a user passes to ``--config``, the one the benchmarks train and the one the tests check
are the same file. A field a file leaves out takes the library's default (ModelConfig, TrainConfig),
which is the default model's: ``default.yaml`` restates nothing, every other file spells out where
it differs, and the asset, the study and the benchmarks resolve a file the same way. What each
preset is and where it comes from: docs/models.md; measured figures:
docs/results.md.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mmctr_assets import deploy

PRESET_DIR = deploy.path("presets")  # package data: a checkout's and an installed wheel's


def preset_file(name: str) -> Path:
    return PRESET_DIR / f"{name}.yaml"


def run_config_sections(doc: dict, source: str) -> dict[str, dict]:
    """``{"model": {...}, "train": {...}}`` of a dcn_din_model run-config fragment."""
    try:
        config = doc["ops"]["dcn_din_model"]["config"]
    except (KeyError, TypeError):
        raise ValueError(f"{source}: expected a run config "
                         "'ops: dcn_din_model: config: model: ... train: ...'") from None
    unknown = sorted(set(config) - {"model", "train", "embedding_source", "tuned"})
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown} under ops.dcn_din_model.config; expected model:, train:")
    return {section: dict(config.get(section) or {}) for section in ("model", "train")}


def _load() -> dict[str, dict[str, dict]]:
    return {path.stem: run_config_sections(yaml.safe_load(path.read_text()), str(path))
            for path in sorted(PRESET_DIR.glob("*.yaml"))}


PRESETS: dict[str, dict[str, dict]] = _load()


def preset(name: str) -> dict[str, dict]:
    """A copy of preset ``name`` (``{"model": {...}, "train": {...}}``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)} (files in {PRESET_DIR})")
    return {section: dict(values) for section, values in PRESETS[name].items()}
