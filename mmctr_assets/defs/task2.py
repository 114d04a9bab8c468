"""Task 2: the DCN-DIN CTR model (tracked in MLflow), test-set predictions and the submission zip."""

import dataclasses
import hashlib
import json
import shutil
import typing
import zipfile

import numpy as np
import polars as pl
import pydantic

import dagster as dg

from .. import settings
from ..lib import dataset
from ..lib.atomic import atomic_path
from ..lib.ctr_model import ModelConfig
from ..lib.training import TrainConfig
from ..resources import ComputeResource, MlflowResource, ProjectStorage
from .common import ProgressLog, log_png_artifact, png_metadata, run_tags
from .task1 import (
    GPU_TAGS,
    fused_item_embeddings,
    item_info_updated_path,
    read_clip_embeddings,
    read_item2vec_embeddings,
)

GROUP = "task2_ctr"
EMBEDDING_SOURCES = ("fused", "content", "item2vec", "organisers")
# set by the compute resource, or meaningless as run config
_NOT_CONFIG = {"precision", "embedding_dim"}


def _config_fields(*dataclass_types) -> dict:
    """Dagster config fields mirroring the library's dataclasses, so defaults live in one place."""
    fields = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in _NOT_CONFIG:
                continue
            hint = hints[f.name]
            if typing.get_origin(hint) is tuple:  # tuples of layer sizes arrive as JSON lists
                hint, default = list[int], list(f.default)
            else:
                default = f.default
            fields[f.name] = (hint, default)
    return fields


DcnDinConfig = pydantic.create_model(
    "DcnDinConfig",
    __base__=dg.Config,
    __doc__="DCN-DIN architecture and training settings (lib/ctr_model.py, lib/training.py).",
    embedding_source=(str, "fused"),
    **_config_fields(ModelConfig, TrainConfig) | {"seed": (int, settings.seed())},
)


def _split_config(config) -> tuple[ModelConfig, TrainConfig]:
    values = config.model_dump()
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    return (
        ModelConfig(**{k: v for k, v in values.items() if k in model_keys}),
        {k: v for k, v in values.items() if k in train_keys},
    )


def item_embedding_table(storage: ProjectStorage, source: str, seed: int) -> np.ndarray:
    """The frozen [n_items + 1, 128] item table the model reads, by source (for ablations).

    fused: Task 1's deliverable; organisers: item_info's own item_emb_d128; content / item2vec:
    the fusion with alpha 1 / 0 (an item without an item2vec vector keeps its content vector).
    """
    if source not in EMBEDDING_SOURCES:
        raise ValueError(f"embedding_source must be one of {EMBEDDING_SOURCES}, got {source!r}")
    if source in ("fused", "organisers"):
        path = (
            storage.require(item_info_updated_path(storage), "fused_item_embeddings")
            if source == "fused"
            else storage.require(storage.raw("item_info"), "raw_item_info")
        )
        emb = pl.read_parquet(path, columns=["item_emb_d128"]).get_column("item_emb_d128")
        return emb.list.to_array(emb.list.len().max()).to_numpy().astype(np.float32)
    from ..lib import fusion

    n_items = pl.scan_parquet(storage.raw("item_info")).select(pl.len()).collect().item() - 1
    clip, i2v = read_clip_embeddings(storage), read_item2vec_embeddings(storage)
    return fusion.fuse_embeddings(
        n_items,
        clip.get_column("item_id").to_numpy(),
        clip.get_column("clip_emb").to_numpy(),
        i2v.get_column("item_id").to_numpy(),
        i2v.get_column("i2v_emb").to_numpy(),
        alpha=1.0 if source == "content" else 0.0,
        seed=seed,
    ).embeddings


def model_dir(storage: ProjectStorage):
    return storage.out("dcn_din_model")


def _fingerprint(*parts: str) -> str:
    return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "mlflow"},
    owners=["team:recsys"],
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="gpu",
    op_tags=GPU_TAGS,
    deps=[fused_item_embeddings, "raw_train", "raw_valid", "raw_item_info"],
    automation_condition=dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed(),
)
def dcn_din_model(
    context: dg.AssetExecutionContext,
    config: DcnDinConfig,
    storage: ProjectStorage,
    compute: ComputeResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    """DCN-DIN CTR model: DIN target attention over the history, a cross network and a deep
    network with Dice. Selected on validation AUC; every run is an MLflow run. An interrupted
    materialisation resumes from its last completed epoch."""
    import mlflow as mlflow_api

    from ..lib import training
    from ..lib.metrics import auc
    from ..lib.plots import plot_roc, plot_training_curves

    model_config, train_values = _split_config(config)
    train_config = TrainConfig(**train_values, precision=compute.precision)
    device = compute.torch_device()
    emb = item_embedding_table(storage, config.embedding_source, config.seed)
    n_items = emb.shape[0] - 1
    train_path = storage.require(storage.raw("train"), "raw_train")
    valid_path = storage.require(storage.raw("valid"), "raw_valid")
    train_t = training.to_tensors(pl.read_parquet(train_path), train_config.max_len, n_items=n_items)
    valid_t = training.to_tensors(pl.read_parquet(valid_path), train_config.max_len, n_items=n_items)
    item_tags = None
    if model_config.use_tag_embedding:
        tags = pl.read_parquet(storage.raw("item_info"), columns=["item_tags"]).get_column("item_tags")
        item_tags = tags.list.to_array(tags.list.len().max()).to_numpy()
    fingerprint = _fingerprint(
        dataset.file_fingerprint(train_path),
        dataset.file_fingerprint(valid_path),
        hashlib.blake2b(emb.tobytes(), digest_size=16).hexdigest(),
        config.embedding_source,
    )
    out = model_dir(storage)
    checkpoints = out / f"checkpoints-{config.embedding_source}"
    params = (
        {"embedding_source": config.embedding_source, "device": str(device), "data_fingerprint": fingerprint}
        | {f"model.{k}": v for k, v in model_config.to_dict().items()}
        | {f"train.{k}": v for k, v in train_config.to_dict().items()}
        | {"train_rows": len(train_t), "valid_rows": len(valid_t), "n_items": n_items}
    )
    with mlflow.start_run(f"dcn_din_{config.embedding_source}", tags=run_tags(context) | {"stage": "task2"}) as run:
        mlflow_api.log_params(params)
        logged: set[int] = set()

        def log_epoch(e) -> None:
            mlflow_api.log_metrics(
                {"train_loss": e.train_loss, "valid_auc": e.valid_auc, "valid_logloss": e.valid_logloss,
                 "lr": e.lr, "samples_per_s": e.samples_per_s},
                step=e.epoch,
            )
            logged.add(e.epoch)
            context.log.info(
                f"epoch {e.epoch}: loss {e.train_loss:.4f}, valid AUC {e.valid_auc:.4f}, "
                f"logloss {e.valid_logloss:.4f}, lr {e.lr:g}, {e.samples_per_s:,.0f} samples/s"
            )

        progress = ProgressLog(context.log, "training steps", every_s=30)
        result = training.train(
            model_config,
            train_config,
            train_t,
            valid_t,
            emb,
            item_tags=item_tags,
            device=device,
            checkpoint_dir=checkpoints,
            data_fingerprint=fingerprint,
            on_epoch_end=log_epoch,
            progress=lambda epoch, step, steps: progress(step, steps),
        )
        context.log.info(result.resume_note)
        for e in result.history:  # epochs finished before a resume
            if e.epoch not in logged:
                log_epoch(e)
        valid_auc = auc(valid_t.label.numpy(), result.valid_predictions)
        mlflow_api.log_metric("best_valid_auc", result.best_valid_auc)
        mlflow_api.set_tag("resume", result.resume_note)
        model_path = training.save_model(result.model, out / "model.pt")
        (out / "model_config.json").write_text(
            json.dumps({"model": model_config.to_dict(), "train": train_config.to_dict(),
                        "embedding_source": config.embedding_source, "data_fingerprint": fingerprint}, indent=2)
        )
        mlflow_api.log_artifact(str(model_path), artifact_path="model")
        mlflow_api.log_artifact(str(out / "model_config.json"), artifact_path="model")
        curves = plot_training_curves(result.history)
        roc = plot_roc(valid_t.label.numpy(), result.valid_predictions)
        log_png_artifact(curves, "training_curves.png")
        log_png_artifact(roc, "valid_roc.png")
    shutil.rmtree(checkpoints, ignore_errors=True)  # finished: the next materialisation trains anew
    return dg.MaterializeResult(
        metadata={
            "best_valid_auc": dg.MetadataValue.float(result.best_valid_auc),
            "valid_auc_check": dg.MetadataValue.float(valid_auc),
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            "resume": result.resume_note,
            "embedding_source": config.embedding_source,
            "data_fingerprint": fingerprint,
            "device": str(device),
            "samples_per_s": round(float(np.mean([e.samples_per_s for e in result.history])), 1),
            "mlflow_run_id": run.info.run_id,
            "mlflow_run": mlflow.run_url(run),
            "model_path": dg.MetadataValue.path(str(model_path)),
            "training_curves": png_metadata(curves, "training curves"),
            "valid_roc": png_metadata(roc, "validation ROC"),
        }
    )


def prediction_path(storage: ProjectStorage):
    return storage.out("prediction.csv")


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "csv"},
    owners=["team:recsys"],
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="gpu",
    op_tags=GPU_TAGS,
    deps=[dcn_din_model, "raw_test"],
    automation_condition=dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed(),
    check_specs=[dg.AssetCheckSpec("predictions_valid", asset="predictions", blocking=True)],
)
def predictions(
    context: dg.AssetExecutionContext, storage: ProjectStorage, compute: ComputeResource
) -> dg.MaterializeResult:
    """Click probability of every test row, keyed by test's own ID column (prediction.csv)."""
    import time

    from ..lib import training

    model = training.load_model(storage.require(model_dir(storage) / "model.pt", "dcn_din_model"))
    config = json.loads((model_dir(storage) / "model_config.json").read_text())
    test = pl.read_parquet(storage.require(storage.raw("test"), "raw_test"))
    tensors = training.to_tensors(test, config["train"]["max_len"], n_items=model.n_items)
    started = time.perf_counter()
    probs = training.predict(model, tensors, device=compute.torch_device(), precision=compute.precision)
    seconds = time.perf_counter() - started
    frame = pl.DataFrame({"ID": test.get_column("ID"), "probability": probs.astype(np.float64)})
    with atomic_path(prediction_path(storage)) as tmp:
        frame.write_csv(tmp)
    written = pl.read_csv(prediction_path(storage))
    problems = _prediction_problems(written, test.get_column("ID"))
    context.log.info(f"{len(probs)} test rows predicted in {seconds:.1f}s ({len(probs) / max(seconds, 1e-9):,.0f} rows/s)")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(written),
            "path": dg.MetadataValue.path(str(prediction_path(storage))),
            "mean_probability": float(written.get_column("probability").mean()),
            "rows_per_s": round(len(probs) / max(seconds, 1e-9), 1),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="predictions_valid",
                passed=not problems,
                description="one row per test row, IDs unique and equal to test's, probabilities finite in [0, 1]: "
                + ("all hold." if not problems else " ".join(problems)),
            )
        ],
    )


def _prediction_problems(pred: pl.DataFrame, test_ids: pl.Series) -> list[str]:
    problems = []
    if pred.height != len(test_ids):
        problems.append(f"{pred.height} predictions for {len(test_ids)} test rows.")
    ids = pred.get_column("ID")
    if ids.n_unique() != pred.height:
        problems.append(f"{pred.height - ids.n_unique()} duplicated IDs.")
    if not ids.sort().equals(test_ids.sort()):
        problems.append("IDs differ from test's ID column.")
    p = pred.get_column("probability")
    bad = int((~p.is_finite() | (p < 0) | (p > 1) | p.is_null()).sum())
    if bad:
        problems.append(f"{bad} probabilities are not finite numbers in [0, 1].")
    return problems


class SubmissionConfig(dg.Config):
    column: str = "Task2"
    """Probability column name: Task2 for a CTR submission, Task1 when scoring Task 1 embeddings."""


@dg.asset(
    group_name=GROUP,
    kinds={"zip"},
    owners=["team:recsys"],
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=[predictions],
    automation_condition=dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed(),
)
def submission_zip(context: dg.AssetExecutionContext, config: SubmissionConfig, storage: ProjectStorage) -> dg.MaterializeResult:
    """The file to upload to Codabench: a zip whose only member is prediction.csv (ID, Task2)."""
    source = prediction_path(storage)
    if not source.exists():
        raise FileNotFoundError(
            f"No predictions at {source}: the predictions asset has not been materialised in "
            f"{storage.output_dir}. Run `dagster asset materialize -m mmctr_assets --select "
            f"'*predictions'` first (or the whole graph: `make demo`)."
        )
    frame = pl.read_csv(source).rename({"probability": config.column})
    out = storage.out("submission.zip")
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("prediction.csv", frame.write_csv())
    context.log.info(f"wrote {out} ({out.stat().st_size:,} bytes)")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "rows": frame.height,
            "columns": frame.columns,
            "bytes": out.stat().st_size,
        }
    )


defs = dg.Definitions(assets=[dcn_din_model, predictions, submission_zip])
