"""Task 2: the CTR model (tracked in MLflow; family dcn_din by default, transformer_dcnv2 or din by
config), test-set predictions and the submission zip."""

import dataclasses
import json
import shutil
import typing
import zipfile

import numpy as np
import polars as pl
import pydantic

import dagster as dg

from .. import settings
from ..lib.ctr.model import ModelConfig
from ..lib.ctr.trainer import TrainConfig
from ..lib.io import array_fingerprint, atomic_path, file_fingerprint, text_fingerprint
from ..resources import ComputeResource, MlflowResource, ProjectStorage
from .common import (ON_GPU, OWNERS, REFRESH_AFTER_UPSTREAM, SINGLE_RUN, TRAINED_ON_FUSED, ProgressLog, cpu_cores,
                     png_metadata, run_tags, torch_threads)
from .embeddings import EMBEDDING_SOURCES, item_embedding_table

GROUP = "task2_ctr"
# set by the compute resource or the item table, so not run config
_NOT_CONFIG = {"precision", "embedding_dim"}
# run config defaults that come from settings (environment variables)
_SETTINGS_DEFAULTS = {"seed": settings.seed(), "level_vocab_size": settings.max_level() + 1}


def _config_section(name: str, cls) -> type[dg.Config]:
    """A Dagster config class mirroring one of the library's config dataclasses, so defaults and
    field names live in one place."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        if f.name in _NOT_CONFIG:
            continue
        hint, default = hints[f.name], _SETTINGS_DEFAULTS.get(f.name, f.default)
        if typing.get_origin(hint) is tuple:  # tuples of layer sizes arrive as JSON lists
            hint, default = list[int], list(default)
        if cls is ModelConfig and f.name == "max_len":  # the data decides (see library_configs)
            hint, default = int | None, None
        fields[f.name] = (hint, default)
    return pydantic.create_model(name, __base__=dg.Config, __doc__=f"Fields of {cls.__name__}.", **fields)


ModelSection = _config_section("ModelSection", ModelConfig)
TrainSection = _config_section("TrainSection", TrainConfig)


class DcnDinConfig(dg.PermissiveConfig):
    """DCN-DIN run config: the item table, `model:` (lib/ctr/model.py ModelConfig) and `train:`
    (lib/ctr/trainer.py TrainConfig). Extra keys are accepted only to be refused with the shape
    that works (the flat keys of earlier versions)."""

    embedding_source: str = "fused"
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    tuned: bool = False
    """Train ctr_tuning's best config (its best_run_config.yaml); keys set in model:/train: here win."""

    def with_tuned(self, output_dir: str) -> "DcnDinConfig":
        """This config with ctr_tuning's best model:/train: merged in when `tuned` (lib/ctr/tuning.py)."""
        if not self.tuned:
            return self
        from ..lib.ctr.tuning import tuned_file, tuned_sections

        model, train = tuned_sections(tuned_file(output_dir), self.model.model_dump(), self.train.model_dump(),
                                      self.model.model_fields_set, self.train.model_fields_set)
        return self.model_copy(update={"model": ModelSection(**model), "train": TrainSection(**train)})

    def library_configs(self, history_width: int) -> tuple[ModelConfig, dict]:
        """-> (ModelConfig, TrainConfig fields without precision), after refusing unknown keys.

        ``model.max_len`` unset reads every position the data holds (``history_width``, the
        training histories' width: 100 on MicroLens); a longer one is refused.
        """
        extra = sorted(set(self.model_dump()) - {"embedding_source", "model", "train", "tuned"})
        if extra:
            model_keys = set(ModelSection.model_fields)
            shape = {"model": {k: "..." for k in extra if k in model_keys},
                     "train": {k: "..." for k in extra if k not in model_keys}}
            raise ValueError(
                f"dcn_din_model config has unknown keys {extra}. Model and training settings sit in "
                f"two sections, e.g. {json.dumps({k: v for k, v in shape.items() if v})} "
                "(ops: dcn_din_model: config: model: ... train: ...; README.md, dcn_din_model)."
            )
        if self.embedding_source not in EMBEDDING_SOURCES:
            raise ValueError(f"embedding_source must be one of {EMBEDDING_SOURCES}, got {self.embedding_source!r}")
        model_values = self.model.model_dump()
        if model_values["max_len"] is None:
            model_values["max_len"] = history_width
        elif model_values["max_len"] > history_width:
            raise ValueError(f"dcn_din_model config: model.max_len={model_values['max_len']} is longer than the "
                             f"training histories ({history_width} positions in raw_train's item_seq); "
                             f"allowed: 1..{history_width}, or leave max_len unset to read them all")
        try:
            model_config = ModelConfig(**model_values)
        except ValueError as e:
            raise ValueError(f"dcn_din_model config, section model: {e}") from None
        return model_config, self.train.model_dump()


def _item_tags(storage: ProjectStorage) -> np.ndarray:
    tags = storage.read_raw("item_info", columns=["item_tags"]).get_column("item_tags")
    return tags.list.to_array(tags.list.len().max()).to_numpy()


@dg.asset(group_name=GROUP, **TRAINED_ON_FUSED, automation_condition=REFRESH_AFTER_UPSTREAM)
def dcn_din_model(
    context: dg.AssetExecutionContext,
    config: DcnDinConfig,
    storage: ProjectStorage,
    compute: ComputeResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    """The CTR model of config model.family: dcn_din (default; DIN target attention with a recency
    embedding, a cross network and a deep network with Dice), transformer_dcnv2 (Transformer over
    the real history items + DCN-V2) or din (the organisers' baseline). Selected on validation AUC;
    every run is an MLflow run. An interrupted materialisation resumes from its last completed
    epoch."""
    import mlflow as mlflow_api

    from ..lib.ctr import artifacts, tensors, trainer
    from ..lib.metrics import auc
    from ..lib.plots import plot_roc, plot_training_curves

    frames = {t: storage.read_raw(t) for t in ("train", "valid")}
    config = config.with_tuned(storage.output_dir)
    model_config, train_values = config.library_configs(tensors.history_width(frames["train"]))
    train_config = TrainConfig(**train_values, precision=compute.precision)
    device = compute.torch_device()
    source = config.embedding_source
    emb = item_embedding_table(storage, source, train_config.seed)
    n_items = emb.shape[0] - 1
    train_t, valid_t = (
        tensors.to_tensors(frame, model_config.max_len, n_items=n_items,
                           level_vocab_size=model_config.level_vocab_size)
        for frame in frames.values()
    )
    del frames
    fingerprint = text_fingerprint(file_fingerprint(storage.raw("train")),
                                   file_fingerprint(storage.raw("valid")), array_fingerprint(emb), source)
    checkpoints = storage.model_dir() / f"checkpoints-{source}"
    params = (
        {"embedding_source": source, "device": str(device), "data_fingerprint": fingerprint}
        | {f"model.{k}": v for k, v in model_config.to_dict().items()}
        | {f"train.{k}": v for k, v in train_config.to_dict().items()}
        | {"train_rows": len(train_t), "valid_rows": len(valid_t), "n_items": n_items}
    )
    tags = run_tags(context) | {"stage": "task2", "family": model_config.family}
    with mlflow.start_run(f"{model_config.family}_{source}", tags=tags) as run:
        mlflow_api.log_params(params)
        logged: set[int] = set()

        def on_epoch_end(e) -> None:
            mlflow.log_epochs([e], logged)
            context.log.info(f"epoch {e.epoch}: loss {e.train_loss:.4f}, valid AUC {e.valid_auc:.4f}, "
                             f"logloss {e.valid_logloss:.4f}, lr {e.lr:g}, {e.samples_per_s:,.0f} samples/s")

        progress = ProgressLog(context.log, "training steps", every_s=30)
        # the free CPU cores as torch threads (one on a GPU), shared with steps running beside it
        want = (compute.cpu_threads or None) if device.type == "cpu" else 1
        with cpu_cores(context.log, storage.cpu_lock_dir(), want, what="dcn_din_model") as cores, torch_threads(cores):
            result = trainer.train(
                model_config, train_config, train_t, valid_t, emb,
                item_tags=_item_tags(storage) if model_config.use_tag_embedding else None,
                device=device, checkpoint_dir=checkpoints, data_fingerprint=fingerprint,
                on_epoch_end=on_epoch_end, progress=lambda epoch, step, steps: progress(step, steps),
            )
        context.log.info(result.resume_note)
        mlflow.log_epochs(result.history, logged)  # epochs trained before a resume
        mlflow_api.log_metric("best_valid_auc", result.best_valid_auc)
        mlflow_api.set_tag("resume", result.resume_note)
        model_path = artifacts.save_model(result.model, storage.model())
        config_path = storage.model_dir() / "model_config.json"
        with atomic_path(config_path) as tmp:
            tmp.write_text(json.dumps({"model": model_config.to_dict(), "train": train_config.to_dict(),
                                       "embedding_source": source, "data_fingerprint": fingerprint}, indent=2))
        mlflow.log_files([model_path, config_path], "model")
        curves = plot_training_curves(result.history)
        roc = plot_roc(valid_t.label.numpy(), result.valid_predictions)
        mlflow.log_png(curves, "training_curves.png")
        mlflow.log_png(roc, "valid_roc.png")
    shutil.rmtree(checkpoints, ignore_errors=True)  # finished: the next materialisation trains anew
    return dg.MaterializeResult(
        metadata={
            "best_valid_auc": dg.MetadataValue.float(result.best_valid_auc),
            # recomputed from the saved best model's predictions: equal to best_valid_auc
            "valid_auc_check": dg.MetadataValue.float(auc(valid_t.label.numpy(), result.valid_predictions)),
            "best_epoch": result.best_epoch,
            # training + evaluation wall time of the epochs up to the best one
            "seconds_to_best": round(sum(e.seconds for e in result.history if e.epoch <= result.best_epoch), 1),
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            "resume": result.resume_note,
            "embedding_source": source,
            "family": model_config.family,
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


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "csv"},
    owners=OWNERS,
    backfill_policy=SINGLE_RUN,
    **ON_GPU,
    deps=[dcn_din_model, "raw_test"],
    automation_condition=REFRESH_AFTER_UPSTREAM,
    check_specs=[dg.AssetCheckSpec("predictions_valid", asset="predictions", blocking=True)],
)
def predictions(context: dg.AssetExecutionContext, storage: ProjectStorage, compute: ComputeResource):
    """Click probability of every test row, keyed by test's own ID column (prediction.csv). The
    new file is checked under a temporary name and replaces the old one only when it passes."""
    import time

    from ..lib.ctr import artifacts, inference, tensors
    from . import publish

    model = artifacts.load_model(storage.require(storage.model(), "dcn_din_model"))
    test = storage.read_raw("test")
    test_t = tensors.to_tensors(test, model.config.max_len, n_items=model.n_items,
                                level_vocab_size=model.config.level_vocab_size)
    started = time.perf_counter()
    probs = inference.predict(model, test_t, device=compute.torch_device(), precision=compute.precision)
    seconds = time.perf_counter() - started
    frame = pl.DataFrame({"ID": test.get_column("ID"), "probability": probs.astype(np.float64)})
    dest = storage.predictions()
    with atomic_path(dest) as staged:  # renamed over `dest` only if the block finishes
        frame.write_csv(staged)
        written = pl.read_csv(staged, schema={"ID": pl.Int64, "probability": pl.Float64})
        problems = _prediction_problems(written, test.get_column("ID"))
        check = dg.AssetCheckResult(
            check_name="predictions_valid",
            passed=not problems,
            description="one row per test row, IDs unique and equal to test's, probabilities finite in [0, 1]: "
            + ("all hold." if not problems else " ".join(problems)),
        )
        if problems:
            yield from publish.refuse(context, "predictions", [dest], [check])
    context.log.info(f"{len(probs)} test rows predicted in {seconds:.1f}s ({len(probs) / max(seconds, 1e-9):,.0f} rows/s)")
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(written),
            "path": dg.MetadataValue.path(str(dest)),
            "mean_probability": float(written.get_column("probability").mean() or 0.0),
            "rows_per_s": round(len(probs) / max(seconds, 1e-9), 1),
        },
        check_results=[check],
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
    owners=OWNERS,
    backfill_policy=SINGLE_RUN,
    deps=[predictions],
    automation_condition=REFRESH_AFTER_UPSTREAM,
)
def submission_zip(context: dg.AssetExecutionContext, config: SubmissionConfig, storage: ProjectStorage) -> dg.MaterializeResult:
    """The file to upload to Codabench: a zip whose only member is prediction.csv (ID, Task2)."""
    source = storage.predictions()
    if not source.exists():
        raise FileNotFoundError(
            f"No predictions at {source}: the predictions asset has not been materialised in "
            f"{storage.output_dir}. Run `dagster asset materialize -m mmctr_assets --select "
            f"'*predictions'` first (or the whole graph: `make demo`)."
        )
    frame = pl.read_csv(source).rename({"probability": config.column})
    out = storage.submission()
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
