"""Task 1 scorer: score an item table the way the challenge does, by training one fixed model on it.

The challenge ranks Task 1 submissions by the AUC of a fixed baseline model trained on the
submitted item embeddings. `task1_score` does the same here with one fixed, documented DIN
configuration (SCORER_MODEL, SCORER_TRAIN: fixed seed and budget), so embedding recipes are
compared by that number and not by whatever the Task 2 model happens to be configured as.

Not automated on purpose: no automation condition, and the weekly retrain_job leaves it out, so
a fused refresh retrains dcn_din_model only. It runs when selected (`--select task1_score`, `*`)
and in full_refresh_job, the whole graph (docs/assets.md, "Task 1 scorer").
"""

import dataclasses

import dagster as dg
from pydantic import Field

from .. import settings
from ..lib.ctr.model_config import ModelConfig
from ..lib.ctr.trainer import TrainConfig
from ..resources import ComputeResource, MlflowResource, ProjectStorage
from .common import ON_GPU, OWNERS, SINGLE_RUN
from .ctr import EMBEDDING_SOURCE_HELP, EmbeddingSource
from .embeddings import GROUP
from .freshness import FreshnessConfig, require_fresh_upstream
from .training import read_model_inputs, train_tracked

# Bump when SCORER_MODEL or SCORER_TRAIN change: scores of different versions are not comparable.
SCORER_VERSION = 1
# The organisers' baseline is a DIN: target attention with unbounded (linear) weights over the
# frozen item table, likes/views levels, a deep network; no cross network, no extra features.
SCORER_MODEL = ModelConfig(
    family="dcn_din",  # spelt out: the library's defaults are the default CTR model's, not the scorer's
    use_id_embedding=False,
    use_tag_embedding=False,
    use_user_embedding=False,
    embedding_regularizer=0.0,
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
    lr_factor=0.1,
    early_stopping_patience=2,
    seed=2025,
    precision="fp32",
    deterministic=True,
)


class Task1ScoreConfig(FreshnessConfig):
    embedding_source: EmbeddingSource = Field(default="fused", description=EMBEDDING_SOURCE_HELP)


def scorer_model() -> ModelConfig:
    """SCORER_MODEL with a likes/views table for every level the raw checks accept (MMCTR_MAX_LEVEL):
    the level range is the data's, not part of the fixed recipe, so a larger one must not fail here
    after raw_* and dcn_din_model accepted it."""
    return dataclasses.replace(SCORER_MODEL, level_vocab_size=settings.max_level() + 1)


@dg.asset(group_name=GROUP, kinds={"pytorch", "mlflow"}, owners=OWNERS, backfill_policy=SINGLE_RUN, **ON_GPU,
          deps=["fused_item_embeddings", "raw_train", "raw_valid", "raw_item_info", "raw_item_emb", "raw_item_feature"])
def task1_score(context: dg.AssetExecutionContext, config: Task1ScoreConfig, storage: ProjectStorage,
                compute: ComputeResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    """Validation AUC of one fixed DIN (seed, budget and architecture fixed: SCORER_MODEL /
    SCORER_TRAIN in defs/scorer.py) trained on the chosen item table: the Task 1 number. The same
    table on the same device gives the same score. Not refreshed by automation or the weekly job."""
    require_fresh_upstream(context, config)
    mlflow.check_reachable(must_exist=storage.model().exists())  # never recreate the store model.pt came from
    source, model_config = config.embedding_source, scorer_model()
    inputs = read_model_inputs(storage, source, SCORER_TRAIN.seed)
    # torch's default threads, not a claim of the free cores: the score must not depend on what runs beside it
    with train_tracked(context, storage, compute, mlflow, inputs=inputs, model_config=model_config,
                       train_config=SCORER_TRAIN, run_name=f"task1_score_{source}",
                       tags={"stage": "task1_score"}, params={"scorer_version": SCORER_VERSION},
                       claim_cores=False) as trained:
        pass
    auc, fp = trained.result.best_valid_auc, trained.fingerprints
    context.log.info(f"task1_score ({source}): valid AUC {auc:.4f} in {trained.seconds:.1f}s")
    return dg.MaterializeResult(metadata=trained.metadata() | {
        "valid_auc": dg.MetadataValue.float(auc),
        "table_fingerprint": fp.table,
        "data_fingerprint": fp.data,
        "scorer_version": SCORER_VERSION,
        "scorer_config": dg.MetadataValue.json({"model": model_config.to_dict(), "train": SCORER_TRAIN.to_dict()}),
    })


defs = dg.Definitions(assets=[task1_score])
