"""Click probabilities from a trained model, in row order, batch by batch."""

from __future__ import annotations

import numpy as np
import torch

from mmctr_assets.lib.ctr.model import CTRModel
from mmctr_assets.lib.ctr.tensors import CTRTensors
from mmctr_assets.lib.precision import autocast, check_precision


def check_user_ids(config, tensors: CTRTensors, name: str) -> None:
    """A model with a user embedding or user statistics needs the user_id column."""
    if config.reads_user_id() and tensors.user_id is None:
        raise ValueError(f"{name} has no user_id but the model reads it (use_user_embedding, use_user_bias or "
                         "use_statistics_features): read a frame with its user_id column")


def predict_batches(model: CTRModel, tensors: CTRTensors, batch_size: int, device: torch.device,
                    precision: str) -> np.ndarray:
    """The loop shared by training-time evaluation and :func:`predict` (inputs already checked).

    Same batch size, same numbers: evaluation and prediction round alike only when they batch alike.
    """
    was_training = model.training
    model.eval()
    out = np.empty(len(tensors), dtype=np.float32)
    try:
        with torch.inference_mode(), autocast(device, precision):
            for start in range(0, len(tensors), batch_size):
                b = tensors.slice(start, start + batch_size).to(device)
                logits = model(*b.model_inputs())
                out[start:start + batch_size] = torch.sigmoid(logits.float()).cpu().numpy()
    finally:
        model.train(was_training)
    return out


def predict(model: CTRModel, tensors: CTRTensors, *, batch_size: int = 4096,
            device: str | torch.device = "cpu", precision: str = "fp32") -> np.ndarray:
    """Click probabilities ``float32 [N]`` in row order (model moved to ``device``).

    Histories are cut to the model's own ``max_len`` (the positions it was trained on).
    """
    device = torch.device(device)
    check_precision(precision, device)
    tensors = tensors.truncate(model.config.max_len)
    check_user_ids(model.config, tensors, "tensors")
    tensors.validate(model.n_items, model.config.level_vocab_size)
    return predict_batches(model.to(device), tensors, batch_size, device, precision)
