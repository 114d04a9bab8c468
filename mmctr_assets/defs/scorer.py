"""Task 1 scorer: score an item table the way the challenge does, by training one fixed model on it.

The challenge ranks Task 1 submissions by the AUC of a fixed baseline model trained on the
submitted item embeddings. `task1_score` does the same here with one fixed, documented DIN
configuration (SCORER_MODEL, SCORER_TRAIN: fixed seed and budget), so embedding recipes are
compared by that number and not by whatever the Task 2 model happens to be configured as.

Not automated on purpose: no automation condition, and the weekly retrain_job leaves it out, so
a fused refresh retrains dcn_din_model only. It runs when selected (`--select task1_score`, `*`)
and in full_refresh_job, the whole graph (README.md, "Task 1 scorer").
"""

import tempfile
import time
from pathlib import Path

import numpy as np

import dagster as dg

from ..lib.ctr.model import ModelConfig
from ..lib.ctr.trainer import TrainConfig
from ..lib.io import array_fingerprint, file_fingerprint, text_fingerprint
from ..resources import ComputeResource, MlflowResource, ProjectStorage
from .common import TRAINED_ON_FUSED, run_tags
from .embeddings import EMBEDDING_SOURCES, GROUP, item_embedding_table

# Bump when SCORER_MODEL or SCORER_TRAIN change: scores of different versions are not comparable.
SCORER_VERSION = 1
# The organisers' baseline is a DIN: target attention with unbounded (linear) weights over the
# frozen item table, likes/views levels, a deep network; no cross network, no extra features.
SCORER_MODEL = ModelConfig(
    position="none",  # history as a set, as in the organisers' DIN (the model default reads order)
    attention_output_activation="linear",
    history_match_features=False,
    use_item_frequency=False,
    cross_layers=0,
)
# Fixed budget: at most 5 epochs of batch 1024 (early stopping and LR cut on valid AUC as in the
# trainer), fixed seed, fp32 and deterministic kernels whatever the compute resource says.
SCORER_TRAIN = TrainConfig(
    lr=1e-3,
    batch_size=1024,
    epochs=5,
    seed=2025,
    precision="fp32",
    deterministic=True,
)


class Task1ScoreConfig(dg.Config):
    embedding_source: str = "fused"
    """Item table to score: fused (Task 1's deliverable), content (PCA of CLIP), item2vec, or
    organisers (item_info's own item_emb_d128)."""


def score_item_table(storage: ProjectStorage, emb: np.ndarray, device, *, log=None):
    """Train the fixed scorer on ``emb`` [n_items + 1, 128] -> (TrainResult, seconds)."""
    from ..lib.ctr import tensors, trainer

    n_items = emb.shape[0] - 1
    train_t, valid_t = (
        tensors.to_tensors(storage.read_raw(t), SCORER_MODEL.max_len, n_items=n_items,
                           level_vocab_size=SCORER_MODEL.level_vocab_size)
        for t in ("train", "valid")
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="task1-score-") as tmp:
        result = trainer.train(
            SCORER_MODEL, SCORER_TRAIN, train_t, valid_t, emb, device=device, checkpoint_dir=Path(tmp),
            on_epoch_end=(lambda e: log.info(f"epoch {e.epoch}: valid AUC {e.valid_auc:.4f}")) if log else None,
        )
    return result, time.perf_counter() - started


@dg.asset(group_name=GROUP, **TRAINED_ON_FUSED)
def task1_score(
    context: dg.AssetExecutionContext,
    config: Task1ScoreConfig,
    storage: ProjectStorage,
    compute: ComputeResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    """Validation AUC of one fixed DIN (seed, budget and architecture fixed: SCORER_MODEL /
    SCORER_TRAIN in defs/scorer.py) trained on the chosen item table: the Task 1 number. The same
    table on the same device gives the same score. Not refreshed by automation or the weekly job."""
    import mlflow as mlflow_api

    source = config.embedding_source
    if source not in EMBEDDING_SOURCES:
        raise ValueError(
            f"task1_score config embedding_source={source!r} is not an item table; choose one of "
            f"{list(EMBEDDING_SOURCES)} (ops: task1_score: config: embedding_source: ...)."
        )
    emb = item_embedding_table(storage, source, SCORER_TRAIN.seed)
    table_fingerprint = array_fingerprint(emb)
    data_fingerprint = text_fingerprint(file_fingerprint(storage.raw("train")),
                                        file_fingerprint(storage.raw("valid")))
    device = compute.torch_device()
    params = (
        {"embedding_source": source, "table_fingerprint": table_fingerprint, "data_fingerprint": data_fingerprint,
         "scorer_version": SCORER_VERSION, "device": str(device), "n_items": emb.shape[0] - 1}
        | {f"model.{k}": v for k, v in SCORER_MODEL.to_dict().items()}
        | {f"train.{k}": v for k, v in SCORER_TRAIN.to_dict().items()}
    )
    with mlflow.start_run(f"task1_score_{source}", tags=run_tags(context) | {"stage": "task1_score"}) as run:
        mlflow_api.log_params(params)
        result, seconds = score_item_table(storage, emb, device, log=context.log)
        mlflow.log_epochs(result.history, set())
        mlflow_api.log_metrics({"best_valid_auc": result.best_valid_auc, "seconds": seconds})
    context.log.info(f"task1_score ({source}): valid AUC {result.best_valid_auc:.4f} in {seconds:.1f}s")
    return dg.MaterializeResult(
        metadata={
            "valid_auc": dg.MetadataValue.float(result.best_valid_auc),
            "embedding_source": source,
            "table_fingerprint": table_fingerprint,
            "data_fingerprint": data_fingerprint,
            "scorer_version": SCORER_VERSION,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "seconds": round(seconds, 1),
            "device": str(device),
            "scorer_config": dg.MetadataValue.json({"model": SCORER_MODEL.to_dict(), "train": SCORER_TRAIN.to_dict()}),
            "mlflow_run_id": run.info.run_id,
            "mlflow_run": mlflow.run_url(run),
        }
    )


defs = dg.Definitions(assets=[task1_score])
