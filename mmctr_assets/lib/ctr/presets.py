"""Named run configs, one per model family: the ``model:`` / ``train:`` sections of the
dcn_din_model run config (README, dcn_din_model, lists them with their measured demo figures).

They are plain dicts so that the README snippet, the benchmarks and a user's run config are the
same thing; merge one into your config (``{"model": preset["model"] | mine, ...}``).
"""

from __future__ import annotations

# LR halving on plateau with room to use it (QIN's schedule, shortened for the demo data).
_HALVING = {"lr_factor": 0.5, "lr_patience": 1, "early_stopping_patience": 3, "epochs": 20}

# A user seen a handful of times overfits its row without a regulariser (best epoch 1-3); the
# whole-table L2 at 2e-3 keeps it near zero unless many rows agree (demo medium: 0.8672 vs 0.8327,
# README).
_USER = {"use_user_embedding": True, "embedding_regularizer": 2e-3}

PRESETS: dict[str, dict[str, dict]] = {
    "dcn_din": {"model": {"family": "dcn_din", "position": "key"} | _USER, "train": dict(_HALVING)},
    # low-rank cross layers: the features are ~470 wide, full-rank DCN-V2 would cost 3x the step
    "transformer_dcnv2": {"model": {"family": "transformer_dcnv2", "cross_rank": 32} | _USER,
                          "train": dict(_HALVING)},
    "din": {"model": {"family": "din"}, "train": {}},
}


def preset(name: str) -> dict[str, dict]:
    """A copy of preset ``name`` (``{"model": {...}, "train": {...}}``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return {section: dict(values) for section, values in PRESETS[name].items()}
