"""Named run configs for dcn_din_model: one YAML file each under ``mmctr_assets/deploy/presets/``.

Each file is a Dagster run-config fragment (``ops: dcn_din_model: config: model: ... train: ...``),
so the file a user passes to ``--config``, the one the benchmarks train and the one the tests check
are the same file. What each preset is and where it comes from: docs/models.md; measured figures:
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


def without_inapplicable_defaults(model: dict, explicit: set[str] | frozenset[str] = frozenset()) -> dict:
    """``model`` with the default preset's values that no longer apply put back to the library's
    defaults, unless set in ``explicit``: its family-specific options (``cross_rank`` of its DCN-V2,
    say) when ``model`` picks another family, since they are tuned for its family and another may not
    read them at all (``model: {family: din}`` must keep working); and its ``embedding_regularizer``
    when ``model`` switches every trainable table off, since it has nothing left to act on."""
    from mmctr_assets.lib.ctr.model_config import FAMILY_SPECIFIC_OPTIONS, TRAINABLE_TABLE_SWITCHES, ModelConfig

    default, fields = PRESETS["default"]["model"], ModelConfig.__dataclass_fields__
    out = dict(model)
    if out.get("family", ModelConfig.family) != default.get("family", ModelConfig.family):
        out |= {k: fields[k].default for k in (FAMILY_SPECIFIC_OPTIONS & default.keys()) - set(explicit)}
    if "embedding_regularizer" not in explicit and not any(out.get(k, fields[k].default)
                                                           for k in TRAINABLE_TABLE_SWITCHES):
        out["embedding_regularizer"] = fields["embedding_regularizer"].default
    return out


def preset(name: str) -> dict[str, dict]:
    """A copy of preset ``name`` (``{"model": {...}, "train": {...}}``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)} (files in {PRESET_DIR})")
    return {section: dict(values) for section, values in PRESETS[name].items()}
