"""One tracked training, shared by dcn_din_model and task1_score: read the inputs (lib/ctr/inputs.py,
which ctr_tuning's trials read too), open an MLflow run with the params, train (logging each epoch), log the
result, and hand back what the asset reports. Then, for the served model only, the champion gate
(lib/ctr/registry.py): register the version, score the champion on the same validation rows,
compare the two with DeLong's paired test, move the aliases, and publish model.pt only on promotion."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from .. import settings
from ..lib import output_paths
from ..lib.ctr import training_run
from ..lib.ctr.inputs import Fingerprints, ModelInputs
from ..lib.ctr.model_config import ModelConfig
from ..lib.ctr.trainer import TrainConfig, TrainResult
from ..lib.io import DiskFullError
from ..lib.redaction import redact, redacted_errors
from ..resources import ComputeResource, MlflowResource, ProjectStorage
from .common import ProgressLog, cpu_cores, png_metadata, run_tags, torch_threads

NOT_WORSE = "not_worse_than_champion"


@dataclass
class Trained:
    result: TrainResult
    frames: dict[str, pl.DataFrame]  # train and valid as the model read them (ModelInputs.frames)
    valid_t: object  # CTRTensors of valid
    fingerprints: Fingerprints
    model_config: ModelConfig
    train_config: TrainConfig
    source: str
    device: object
    run: object  # the MLflow run (still active inside train_tracked's block)
    run_url: str
    seconds: float
    plots: dict = field(default_factory=dict)  # metadata images, when train_tracked(plots=True)

    def metadata(self) -> dict:
        r = self.result
        return {
            "best_epoch": r.best_epoch,
            "epochs_run": len(r.history),
            # training + evaluation wall time of the epochs up to the best one
            "seconds_to_best": round(sum(e.seconds for e in r.history if e.epoch <= r.best_epoch), 1),
            "seconds": round(self.seconds, 1),
            "embedding_source": self.source,
            "family": self.model_config.family,
            "device": str(self.device),
            "samples_per_s": round(float(np.mean([e.samples_per_s for e in r.history])), 1),
            "mlflow_run_id": self.run.info.run_id,
            "mlflow_run": self.run_url,
        }


def read_model_inputs(storage: ProjectStorage, source: str, seed: int, train_rows: int | None = None) -> ModelInputs:
    """The inputs of a training on ``source``'s item table (lib/ctr/inputs.py): every Task 2 asset reads them here."""
    from ..lib.ctr.inputs import read_inputs
    from .embeddings import item_embedding_table

    return read_inputs(storage, source, lambda s: item_embedding_table(storage, s, seed),
                       max_level=settings.max_level(), train_rows=train_rows, seed=seed)


@contextlib.contextmanager
def train_tracked(context: dg.AssetExecutionContext, storage: ProjectStorage, compute: ComputeResource,
                  mlflow: MlflowResource, *, inputs: ModelInputs, model_config: ModelConfig,
                  train_config: TrainConfig, run_name: str, tags: dict[str, str],
                  params: dict | None = None, checkpoint_dir: Path | None = None, claim_cores: bool = True,
                  plots: bool = False) -> Iterator[Trained]:
    """Train inside an MLflow run and yield the result while the run is still open (so the caller
    can log or register more). ``checkpoint_dir`` None trains in a temp folder (no resume); given,
    an interrupted training resumes there, and the folder is removed once the block finishes."""
    from ..lib.ctr import trainer
    from ..lib.plots import plot_roc, plot_training_curves

    if checkpoint_dir is not None:  # refused before training, not at the delete afterwards
        output_paths.inside(storage.output_dir, checkpoint_dir, "checkpoint folder")
    device = compute.torch_device()
    n_items, source = inputs.n_items, inputs.source
    train_t, valid_t = inputs.tensors(model_config.max_len, model_config.level_vocab_size)
    fp = inputs.fingerprints_for(model_config)
    logged: set[int] = set()

    def on_epoch_end(e) -> None:
        mlflow.log_epochs([e], logged)
        context.log.info(f"epoch {e.epoch}: loss {e.train_loss:.4f}, valid AUC {e.valid_auc:.4f}, "
                         f"logloss {e.valid_logloss:.4f}, lr {e.lr:g}, {e.samples_per_s:,.0f} samples/s")

    progress = ProgressLog(context.log, "training steps", every_s=30)
    with mlflow.start_run(run_name, tags=run_tags(context) | tags) as run, \
            contextlib.ExitStack() as stack:
        mlflow.log_params(training_run.run_params(source, str(device), fp, model_config, train_config,
                                                  train_t, valid_t, n_items) | (params or {}))
        folder = checkpoint_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mmctr-train-")))
        if claim_cores:  # the free CPU cores as torch threads (one on a GPU), shared with steps beside it
            want = (compute.cpu_threads or None) if device.type == "cpu" else 1
            stack.enter_context(torch_threads(stack.enter_context(
                cpu_cores(context.log, storage.cpu_lock_dir(), want, what=context.asset_key.to_user_string()))))
        started = time.perf_counter()
        try:
            result = trainer.train(
                model_config, train_config, train_t, valid_t, inputs.item_table, **inputs.model_tables(model_config),
                device=device,
                checkpoint_dir=folder, data_fingerprint=fp.run, on_epoch_end=on_epoch_end,
                progress=lambda epoch, step, steps: progress(step, steps),
            )
        except DiskFullError as e:  # say what the checkpoint folder left on disk is for
            kept = sorted(p.name for p in Path(folder).glob("*.pt"))
            raise DiskFullError(e.errno, f"{e.strerror} Training stopped; {folder} keeps {kept or 'no checkpoint'}"
                                + (" (the last completed epoch): the next materialisation resumes from there, or "
                                   "delete the folder to start over." if kept and checkpoint_dir else ".")) from e
        seconds = time.perf_counter() - started
        stack.close()  # cores back before the caller's registry work
        context.log.info(result.resume_note)
        mlflow.log_epochs(result.history, logged)  # epochs trained before a resume
        mlflow.log_metrics({"best_valid_auc": result.best_valid_auc, "seconds": seconds})
        mlflow.set_tag("resume", result.resume_note)
        trained = Trained(result, inputs.frames, valid_t, fp, model_config, train_config, source, device, run,
                          mlflow.run_url(run), seconds)
        if plots:
            curves = plot_training_curves(result.history)
            roc = plot_roc(valid_t.label.numpy(), result.valid_predictions)
            mlflow.log_png(curves, "training_curves.png")
            mlflow.log_png(roc, "valid_roc.png")
            trained.plots = {"training_curves": png_metadata(curves, "training curves"),
                             "valid_roc": png_metadata(roc, "validation ROC")}
        yield trained
    if checkpoint_dir is not None:
        # finished: the next materialisation trains anew
        output_paths.remove_tree(storage.output_dir, checkpoint_dir, "checkpoint folder")


# ------------------------------------------------------------------------------ champion gate


def champion_model_file(storage: ProjectStorage, mlflow: MlflowResource):
    """(verified local model.pt of the champion, its ModelVersion): dcn_din_model/model.pt when its
    hash matches the champion's, else a copy downloaded from the registry."""
    from ..lib.ctr.registry import ChampionFilesMissing

    with redacted_errors():  # MLflow's errors quote the server URL, credentials included
        registry = mlflow.registry()
        champion = registry.champion()
    if champion is None:
        raise ChampionFilesMissing(
            f"registered model {mlflow.registered_model!r} in {redact(mlflow.tracking_uri)} has no version with alias "
            "'champion': promote a registered version (`mmctr-model list`, then `mmctr-model promote VERSION`), "
            "or, in a registry without versions, materialise dcn_din_model (its first version is promoted).")
    with redacted_errors():
        return registry.model_file(champion, storage.model_dir() / "registry", storage.model()), champion


def _score_champion(storage: ProjectStorage, mlflow: MlflowResource, trained: Trained, champion):
    """DeLong's paired comparison of the new model with the champion, scored now on the validation
    rows the new model was selected on (new minus champion)."""
    from ..lib.ctr import artifacts, inference, tensors
    from ..lib.ctr.registry import ChampionUnusable
    from ..lib.metrics import delong_test

    path = mlflow.registry().model_file(champion, storage.model_dir() / "registry", storage.model())
    try:
        model = artifacts.load_model(path)
        valid = tensors.to_tensors(trained.frames["valid"], model.config.max_len, n_items=model.n_items,
                                   level_vocab_size=model.config.level_vocab_size)
    except ValueError as e:  # an older model format, or items the champion does not know
        raise ChampionUnusable(f"champion v{champion.version}: {e}") from None
    probs = inference.predict(model, valid, batch_size=trained.train_config.eval_batch_size,
                              device=trained.device, precision=trained.train_config.precision)
    return delong_test(valid.label.numpy(), trained.result.valid_predictions, probs)


def register_and_gate(context: dg.AssetExecutionContext, storage: ProjectStorage, mlflow: MlflowResource,
                      trained: Trained) -> dg.AssetCheckResult:
    """Register the trained model as a new version and run the champion gate; on promotion the
    version's files replace dcn_din_model/model.pt and model_config.json, otherwise nothing local
    changes. Call inside train_tracked's block (the version belongs to its run)."""
    from ..lib.ctr import artifacts
    from ..lib.ctr.registry import TAG_AUC, TAG_ITEMS

    fp, result = trained.fingerprints, trained.result
    storage.model_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=storage.model_dir(), prefix=".candidate-") as tmp:
        model_file = artifacts.save_model(result.model, Path(tmp) / "model.pt")
        config_file = Path(tmp) / "model_config.json"
        config_file.write_text(json.dumps({"model": trained.model_config.to_dict(),
                                           "train": trained.train_config.to_dict(), "embedding_source": trained.source,
                                           "data_fingerprint": fp.run, "item_info_fingerprint": fp.item_info},
                                          indent=2))
        version = mlflow.register_model(trained.run, model_file, config_file, {
            TAG_AUC: f"{result.best_valid_auc:.8f}", "data_fingerprint": fp.run, TAG_ITEMS: fp.item_info,
            "dagster.run_id": context.run.run_id, "embedding_source": trained.source,
            "family": trained.model_config.family})
        decision = mlflow.registry().gate(
            version, result.best_valid_auc, lambda mv: _score_champion(storage, mlflow, trained, mv),
            mlflow.promotion_tolerance, owner=f"{context.run.run_id}:{os.getpid()}", alpha=mlflow.gate_alpha)
        mlflow.set_tag("registered_version", f"{mlflow.registered_model}/{version} ({decision.alias})")
        if decision.comparison is not None:  # the paired test, beside the run's other metrics
            mlflow.log_metrics({f"gate_{k}": v for k, v in decision.test_summary().items()}
                               | {"gate_champion_valid_auc": decision.champion_auc})
            mlflow.set_tag("gate", decision.note)
        if decision.promoted:  # the champion's local copy, what predictions reads without a download
            os.replace(model_file, storage.model())
            os.replace(config_file, storage.model_dir() / "model_config.json")
    (context.log.info if decision.promoted else context.log.error)(
        f"{mlflow.registered_model} version {version}: {decision.alias}. {decision.note}")
    metadata = {"version": version, "alias": decision.alias, "valid_auc": decision.new_auc,
                "champion_version": decision.champion_version or "", "tolerance": decision.tolerance,
                "registered_model": mlflow.registered_model}
    if decision.champion_auc is not None:
        metadata["champion_valid_auc"] = decision.champion_auc
    metadata |= decision.test_summary()
    return dg.AssetCheckResult(
        check_name=NOT_WORSE, passed=decision.promoted, metadata=metadata,
        description=f"version {version} -> alias {decision.alias}: {decision.note}"
        + ("" if decision.promoted or not decision.champion_version
           else "; the champion keeps serving predictions and the submission"))
