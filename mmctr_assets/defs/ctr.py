"""Task 2: the CTR model (tracked in MLflow; family transformer_dcnv2 by default, dcn_din or din by
config), test-set predictions and the submission zip."""

import dataclasses
import json
import typing
import zipfile

import dagster as dg
import numpy as np
import polars as pl
import pydantic
from pydantic import Field

from .. import settings
from ..lib.ctr.model_config import FAMILIES, ModelConfig
from ..lib.ctr.trainer import TrainConfig
from ..lib.io import atomic_path
from ..resources import ComputeResource, MlflowResource, ProjectStorage
from .common import ON_GPU, OWNERS, REFRESH_AFTER_UPSTREAM, SINGLE_RUN, launched_config
from .embeddings import EMBEDDING_SOURCES
from .freshness import FreshnessConfig, require_fresh_upstream
from .training import NOT_WORSE, champion_model_file, read_model_inputs, register_and_gate, train_tracked

GROUP = "task2_ctr"
# set by the compute resource or the item table, so not run config
_NOT_CONFIG = {"precision", "embedding_dim"}
# run config defaults that come from settings (environment variables)
_SETTINGS_DEFAULTS = {"seed": settings.seed(), "level_vocab_size": settings.max_level() + 1}
# the item tables a model can read (checked by Dagster at launch: a Literal becomes an enum)
EmbeddingSource = typing.Literal[EMBEDDING_SOURCES]
EMBEDDING_SOURCE_HELP = ("Item table the model reads: fused (Task 1's deliverable), content (PCA of CLIP), "
                         "item2vec, organisers (item_info's own item_emb_d128), or item_emb:<column> (a column of "
                         "the real download's item_emb.parquet, e.g. item_emb:item_emb_d128_v3).")
# launchpad descriptions; a field without one points at its dataclass
_HELP = {
    "family": "Model family: transformer_dcnv2 (default), dcn_din, or din (the organisers' baseline).",
    "max_len": "History positions read (the most recent ones); unset: every position the data holds.",
    "lr": "AdamW learning rate.", "weight_decay": "AdamW weight decay.", "batch_size": "Training batch size.",
    "epochs": "Most epochs; early stopping on valid AUC may end sooner.",
    "grad_clip_norm": "Gradient norm clip (null: none).", "lr_factor": "LR multiplier on a valid-AUC plateau.",
    "lr_patience": "Non-improving epochs before the LR is cut.",
    "early_stopping_patience": "Non-improving epochs before training stops.",
    "seed": "Seed of initialisation and batch order (default: MMCTR_SEED).",
    "eval_batch_size": "Batch size of validation scoring.",
    "num_threads": "torch threads (null: the cores the step leased; set it for bit-equal AUC across loads).",
    "sparse_embedding_updates": "Update and regularise only the table rows a batch touches (each caught up on "
                                "the regulariser's pull it missed): a step cost that does not grow with the "
                                "catalog. false: whole tables every step.",
    "deterministic": "Deterministic torch kernels.",
    "use_statistics_features": "Add the target item's and the user's smoothed click rates and log counts from the "
                               "training rows (out of fold on training rows; saved with the model). Needs user_id.",
    "statistics_prior_strength": "Pseudo-rows at the mean click rate in each smoothed rate (> 0).",
    "statistics_folds": "Folds of the training rows' out-of-fold statistics (>= 2; assigned with train.seed).",
    "use_item_levels": "Embed each item's own likes/views level (raw_item_feature's, per item) into its vector, "
                       "for the target and every history position; null row levels are filled from them either "
                       "way. Needs item_feature.parquet with both levels for every item.",
}


def _config_section(name: str, cls) -> type[dg.Config]:
    """A Dagster config class mirroring one of the library's config dataclasses, so defaults and
    field names live in one place: a field a run config (or a preset file) leaves out takes the
    library's default, which is the default model's (deploy/presets/default.yaml restates nothing)."""
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
        if cls is ModelConfig and f.name == "family":
            hint = typing.Literal[FAMILIES]  # refused at launch, with the choices
        help_ = _HELP.get(f.name, f"{cls.__name__}.{f.name} (lib/ctr/).")
        fields[f.name] = (hint, Field(default=default, description=help_))
    return pydantic.create_model(name, __base__=dg.Config, __doc__=f"Fields of {cls.__name__}.", **fields)


ModelSection = _config_section("ModelSection", ModelConfig)
TrainSection = _config_section("TrainSection", TrainConfig)


class DcnDinConfig(dg.PermissiveConfig, FreshnessConfig):
    """dcn_din_model's run config (the asset keeps its name; its default model is the Transformer +
    DCN-V2 over trainable ids, ModelConfig's defaults): the item table, `model:`
    (lib/ctr/model_config.py ModelConfig) and `train:` (lib/ctr/trainer.py TrainConfig). Extra keys
    are accepted only to be refused with the shape that works (the flat keys of earlier versions)."""

    embedding_source: EmbeddingSource = Field(default="fused", description=EMBEDDING_SOURCE_HELP)
    model: ModelSection = Field(default=ModelSection(), description="Model architecture (ModelConfig); unset "
                                "fields take the default model's values: a Transformer + DCN-V2 over trainable "
                                "item-id, tag and user embeddings (family transformer_dcnv2).")
    train: TrainSection = Field(default=TrainSection(), description="Optimisation (TrainConfig).")
    tuned: bool = Field(default=False, description="Train ctr_tuning's best config (its best_run_config.yaml); "
                        "keys set in model:/train: here win.")

    def with_tuned(self, output_dir: str, launched: dict | None = None) -> "DcnDinConfig":
        """This config with ctr_tuning's best model:/train: merged in when `tuned` (lib/ctr/tuning.py);
        a key the user set in model:/train: wins. ``launched``: the op's config as the run was launched
        (what the user typed). Dagster's config processing marks some fields set that the user never
        typed (a Literal such as ``family`` always), so the pydantic field set alone would keep the
        default family over the study's; without ``launched`` (a config built in code) it is used."""
        if not self.tuned:
            return self
        from ..lib.ctr.tuning import tuned_file, tuned_sections

        if launched is None:
            keep_model, keep_train = self.model.model_fields_set, self.train.model_fields_set
        else:
            keep_model, keep_train = (set(launched.get(section) or {}) for section in ("model", "train"))
        model, train = tuned_sections(tuned_file(output_dir), self.model.model_dump(), self.train.model_dump(),
                                      keep_model, keep_train)
        return self.model_copy(update={"model": ModelSection(**model), "train": TrainSection(**train)})

    def library_configs(self, history_width: int) -> tuple[ModelConfig, dict]:
        """-> (ModelConfig, TrainConfig fields without precision), after refusing unknown keys.

        ``model.max_len`` unset reads every position the data holds (``history_width``, the
        training histories' width: 100 on MicroLens); a longer one is refused.
        """
        extra = sorted(set(self.model_dump()) - {"embedding_source", "model", "train", "tuned", "allow_stale_upstream"})
        if extra:
            model_keys = set(ModelSection.model_fields)
            shape = {"model": {k: "..." for k in extra if k in model_keys},
                     "train": {k: "..." for k in extra if k not in model_keys}}
            raise ValueError(
                f"dcn_din_model config has unknown keys {extra}. Model and training settings sit in "
                f"two sections, e.g. {json.dumps({k: v for k, v in shape.items() if v})} "
                "(ops: dcn_din_model: config: model: ... train: ...; docs/models.md)."
            )
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


@dg.asset(group_name=GROUP, kinds={"pytorch", "mlflow"}, owners=OWNERS, backfill_policy=SINGLE_RUN, **ON_GPU,
          # raw_item_emb: the item_emb:<column> tables; raw_item_feature: the per-item levels
          deps=["fused_item_embeddings", "raw_train", "raw_valid", "raw_item_info", "raw_item_emb", "raw_item_feature"],
          automation_condition=REFRESH_AFTER_UPSTREAM,
          check_specs=[dg.AssetCheckSpec(NOT_WORSE, asset="dcn_din_model", blocking=True,
                                         description="Not significantly worse than the champion, scored now "
                                         "on the same validation rows: DeLong's paired one-sided test at "
                                         "MlflowResource.gate_alpha with margin promotion_tolerance. Metadata: "
                                         "auc_diff, its interval and p_value_worse")])
def dcn_din_model(context: dg.AssetExecutionContext, config: DcnDinConfig, storage: ProjectStorage,
                  compute: ComputeResource, mlflow: MlflowResource):
    """The CTR model of config model.family: transformer_dcnv2 (default; a Transformer over the real
    history items + DCN-V2 over trainable id, tag and user tables), dcn_din (DIN target attention
    with a recency embedding, a cross network and a deep network with Dice) or din (the organisers'
    baseline). Every run is an MLflow run
    and a new version of the registered model; it replaces model.pt (and so feeds predictions) only
    when the champion gate promotes it. An interrupted materialisation resumes from its last epoch."""
    from . import publish

    require_fresh_upstream(context, config)
    # before hours of training, not after; a registry that served model.pt must still exist
    mlflow.check_reachable(must_exist=storage.model().exists())
    config = config.with_tuned(storage.output_dir, launched_config(context))
    source, seed = config.embedding_source, config.train.seed
    inputs = read_model_inputs(storage, source, seed)
    model_config, train_values = config.library_configs(inputs.history_width)
    train_config = TrainConfig(**train_values, precision=compute.precision)
    with train_tracked(context, storage, compute, mlflow, inputs=inputs, model_config=model_config,
                       train_config=train_config, plots=True,
                       run_name=f"{model_config.family}_{source}",
                       tags={"stage": "task2", "family": model_config.family},
                       checkpoint_dir=storage.model_dir() / f"checkpoints-{source}") as trained:
        check = register_and_gate(context, storage, mlflow, trained)
    if not check.passed:
        yield from publish.refuse(context, "dcn_din_model", [storage.model()], [check],
                                  next_step=_gate_next_step(check))
    yield dg.MaterializeResult(check_results=[check], metadata=trained.metadata() | trained.plots | {
        "best_valid_auc": dg.MetadataValue.float(trained.result.best_valid_auc),
        "data_fingerprint": trained.fingerprints.run,
        "registered_version": check.metadata["version"].value,
        "resume": trained.result.resume_note, "stopped_early": trained.result.stopped_early,
        "model_path": dg.MetadataValue.path(str(storage.model())),
    })


class PredictionsConfig(FreshnessConfig):
    """predictions has no settings of its own: the champion decides the model."""


def _gate_next_step(check: dg.AssetCheckResult) -> str:
    """What a champion-gate refusal means for serving, and how to serve the new version anyway."""
    version, champion = check.metadata["version"].value, check.metadata["champion_version"].value
    serving = (f"The champion (version {champion}) keeps serving predictions and the submission; nothing "
               "downstream is blocked." if champion else "No version serves until one is promoted.")
    return f"{serving} To serve version {version} anyway: `mmctr-model promote {version}`."


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "csv"},
    owners=OWNERS,
    backfill_policy=SINGLE_RUN,
    **ON_GPU,
    deps=[dcn_din_model, "raw_test", "raw_item_feature"],  # item levels fill a null row level
    automation_condition=REFRESH_AFTER_UPSTREAM,
    check_specs=[dg.AssetCheckSpec("predictions_valid", asset="predictions", blocking=True)],
)
def predictions(context: dg.AssetExecutionContext, config: PredictionsConfig, storage: ProjectStorage,
                compute: ComputeResource, mlflow: MlflowResource):
    """Click probability of every test row, keyed by test's own ID column (prediction.csv), by the
    registered model's champion (models:/<registered_model>@champion, read from its verified local
    copy). The new file is checked under a temporary name and replaces the old one only when it
    passes."""
    import time

    from ..lib.ctr import artifacts, inference, inputs, tensors
    from . import publish

    require_fresh_upstream(context, config)
    mlflow.check_reachable(must_exist=True)  # a reader: a missing store is an error, never created here
    model_file, champion = champion_model_file(storage, mlflow)
    context.log.info(f"serving {mlflow.registered_model} version {champion.version} (champion) from {model_file}")
    model = artifacts.load_model(model_file)
    test = inputs.read_test(storage, model, settings.max_level())
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
    context.log.info(f"{len(probs)} test rows predicted in {seconds:.1f}s "
                     f"({len(probs) / max(seconds, 1e-9):,.0f} rows/s)")
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(written),
            "path": dg.MetadataValue.path(str(dest)),
            "mean_probability": float(written.get_column("probability").mean() or 0.0),
            "rows_per_s": round(len(probs) / max(seconds, 1e-9), 1),
            "model_version": str(champion.version),
            "model_uri": f"models:/{mlflow.registered_model}@champion",
            "model_mlflow_run_id": champion.run_id,
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


class SubmissionConfig(FreshnessConfig):
    column: typing.Literal["Task2", "Task1"] = Field(
        default="Task2", description="Probability column of prediction.csv: Task2 for a CTR submission, "
        "Task1 when scoring Task 1 embeddings (the scorer reads no other name).")


@dg.asset(
    group_name=GROUP,
    kinds={"zip"},
    owners=OWNERS,
    backfill_policy=SINGLE_RUN,
    deps=[predictions],
    automation_condition=REFRESH_AFTER_UPSTREAM,
)
def submission_zip(context: dg.AssetExecutionContext, config: SubmissionConfig,
                   storage: ProjectStorage) -> dg.MaterializeResult:
    """The file to upload to Codabench: a zip whose only member is prediction.csv (ID, Task2)."""
    require_fresh_upstream(context, config)
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
            # a fixed entry time: the same predictions give the same zip, byte for byte
            member = zipfile.ZipInfo("prediction.csv", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(member, frame.write_csv(), compress_type=zipfile.ZIP_DEFLATED)
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
