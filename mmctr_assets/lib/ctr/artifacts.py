"""The model file: weights plus everything needed to rebuild the model (config, table shapes, the
history length it reads), written atomically, with a format tag that turns an old file into a
"retrain" message instead of a state-dict traceback."""

from __future__ import annotations

from pathlib import Path

import torch

from mmctr_assets.lib.ctr.model import CTRModel
from mmctr_assets.lib.ctr.model_config import ModelConfig
from mmctr_assets.lib.io import atomic_path

# /2: sigmoid attention, history-match features and the item-frequency buffer
# /3: max_len moved into the model config (the file says which history positions it reads)
# /4: ModelConfig.family (dcn_din with recency, transformer_dcnv2, din) and the user embedding
MODEL_FORMAT = "mmctr.dcn_din.model/5"  # /5: item/user biases, head MLP, lambda/2 regulariser


def save_model(model: CTRModel, path: str | Path) -> Path:
    """Atomically write weights plus architecture (config and table shapes) to ``path``."""
    return save_weights(model.to_dict(), model.state_dict(), path)


def save_weights(architecture: dict, state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """:func:`save_model` for a state dict kept apart from its model (the best epoch's weights)."""
    artifact = {"format": MODEL_FORMAT, "architecture": architecture,
                "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}
    with atomic_path(path) as tmp:
        torch.save(artifact, tmp)
    return Path(path)


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> CTRModel:
    """Rebuild a :func:`save_model` artifact as a :class:`CTRModel` in eval mode."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}; train the model first (train() writes "
                                "checkpoint_dir/best.pt, or call save_model)")
    try:
        artifact = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable torch file ({type(e).__name__}: {e})") from e
    found = artifact.get("format") if isinstance(artifact, dict) else None
    if isinstance(found, str) and found.startswith("mmctr.dcn_din.model/") and found != MODEL_FORMAT:
        raise ValueError(f"{path} was written by another mmctr version (format {found!r}, this one "
                         f"reads {MODEL_FORMAT!r}); retrain it: materialise dcn_din_model again")
    if found != MODEL_FORMAT:
        raise ValueError(f"{path} is not an mmctr CTR model written by save_model "
                         f"(expected format {MODEL_FORMAT!r})")
    architecture = artifact["architecture"]
    model = CTRModel.from_dict(architecture, ModelConfig.from_dict(architecture["config"]))
    model.load_state_dict(artifact["state_dict"])
    return model.to(map_location).eval()
