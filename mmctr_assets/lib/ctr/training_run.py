"""What every tracked training of a CTR model records, whoever runs it (dcn_din_model, task1_score,
a tuning trial): its flat MLflow params (its inputs and their fingerprints: inputs.py).

Dagster-free; the Dagster glue (MLflow run, CPU cores, logs, metadata) is defs/training.py.
"""

from __future__ import annotations

from mmctr_assets.lib.ctr.inputs import Fingerprints
from mmctr_assets.lib.ctr.model_config import ModelConfig
from mmctr_assets.lib.ctr.tensors import CTRTensors
from mmctr_assets.lib.ctr.trainer import TrainConfig


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
