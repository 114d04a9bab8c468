"""What every tracked training of a CTR model records, whoever runs it (dcn_din_model, task1_score,
a tuning trial): the fingerprints of its inputs and its flat MLflow params.

Dagster-free; the Dagster glue (MLflow run, CPU cores, logs, metadata) is defs/training.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from mmctr_assets.lib.ctr import tensors
from mmctr_assets.lib.ctr.model_config import ModelConfig
from mmctr_assets.lib.ctr.tensors import CTRTensors
from mmctr_assets.lib.ctr.trainer import TrainConfig
from mmctr_assets.lib.io import array_fingerprint, file_fingerprint, text_fingerprint


@dataclass(frozen=True)
class Fingerprints:
    """Content hashes of a training's inputs."""

    train: str
    valid: str
    table: str  # the frozen item table the model reads
    item_info: str  # raw_item_info: which items exist (a rollback must match it)
    source: str  # embedding_source

    @property
    def data(self) -> str:
        """train + valid: the rows, whatever item table is used."""
        return text_fingerprint(self.train, self.valid)

    @property
    def run(self) -> str:
        """Everything that decides the trained weights besides the configs (resumes compare it)."""
        return text_fingerprint(self.train, self.valid, self.table, self.source)


def fingerprints(train: Path, valid: Path, item_info: Path, emb: np.ndarray, source: str) -> Fingerprints:
    return Fingerprints(file_fingerprint(train), file_fingerprint(valid), array_fingerprint(emb),
                        file_fingerprint(item_info), source)


def build_tensors(frames: dict[str, pl.DataFrame], model_config: ModelConfig,
                  n_items: int) -> tuple[CTRTensors, CTRTensors]:
    """(train, valid) tensors cut to the model's history length, ids range-checked against the table."""
    train_t, valid_t = (tensors.to_tensors(frames[t], model_config.max_len, n_items=n_items,
                                           level_vocab_size=model_config.level_vocab_size)
                        for t in ("train", "valid"))
    return train_t, valid_t


def run_params(source: str, device: str, fp: Fingerprints, model_config: ModelConfig, train_config: TrainConfig,
               train_t: CTRTensors, valid_t: CTRTensors, n_items: int) -> dict:
    """The flat params of one training's MLflow run."""
    return (
        {"embedding_source": source, "device": device, "data_fingerprint": fp.run,
         "rows_fingerprint": fp.data, "table_fingerprint": fp.table, "item_info_fingerprint": fp.item_info}
        | {f"model.{k}": v for k, v in model_config.to_dict().items()}
        | {f"train.{k}": v for k, v in train_config.to_dict().items()}
        | {"train_rows": len(train_t), "valid_rows": len(valid_t), "n_items": n_items}
    )
