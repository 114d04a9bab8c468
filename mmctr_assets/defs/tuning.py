"""Task 2, choose by validation: ctr_tuning runs an Optuna study over dcn_din_model's run config
(lib/ctr/tuning.py, docs/tuning.md). Each trial is an MLflow child run under one parent run; the
best trial becomes a run-config file that dcn_din_model trains with `tuned: true`."""

from pathlib import Path

import dagster as dg
from pydantic import field_validator

from .. import deploy, settings
from ..lib import output_paths
from ..lib.ctr import tuning
from ..lib.io import file_fingerprint
from ..lib.redaction import redact
from ..resources import ComputeResource, MlflowResource, ProjectStorage
from .common import TRAINED_ON_FUSED, cpu_cores, png_metadata, run_tags, torch_threads
from .freshness import FreshnessConfig, require_fresh_upstream

GROUP = "task2_ctr"
DEFAULT_SEARCH_SPACE = deploy.path("tuning", "search_space.yaml")
# Optuna's tables in the instance's Postgres database live in their own schema: both Optuna and
# Dagster keep an `alembic_version` table, which would collide in one schema.
PG_SCHEMA = "optuna"


class TuningConfig(FreshnessConfig):
    n_trials: int = 12
    """Trials the study should hold (finished, pruned or failed by their own error); a resumed study
    counts its earlier ones, so re-running after a kill runs only the rest."""
    budget_minutes: float | None = 60.0
    """The study's wall time, counted from the step's start: no trial starts after it and a running
    trial is stopped at it (pruned), so the step ends within it plus writing the best config at any
    data size. Trials run few epochs first (Hyperband), on trial_rows rows. null: unbounded."""
    trial_rows: int | None = 1_000_000
    """Training rows each trial trains on: a seeded random sample when the data holds more (valid
    stays whole). Only the best config then trains on every row (dcn_din_model, tuned: true).
    null: every row."""
    search_space: str = str(DEFAULT_SEARCH_SPACE)
    """Search-space YAML (docs/tuning.md); deploy/tuning/search_space_demo.yaml is the demo's."""
    study_name: str = "ctr_tuning"
    """Same name and storage: the study resumes (load_if_exists); a new name starts a new study. A
    plain name (letters, digits, . _ -): it names the study's checkpoint folder in the outputs."""
    storage: str = ""
    """Optuna RDB storage URL; empty: the Dagster instance's own database (sqlite file in its
    home, or its Postgres database, schema optuna, which workers on several pods share)."""
    seed: int = settings.seed()
    """Seeds the TPE sampler and every trial's training."""
    pruning: bool = True
    """Hyperband over epochs: stop a trial that is not in the best third of its bracket at an epoch
    rung (1, 3, 9, ... epochs)."""

    @field_validator("study_name")
    @classmethod
    def _plain_study_name(cls, value: str) -> str:
        return output_paths.check_name(value, "ctr_tuning config study_name")


def instance_storage_url(instance: dg.DagsterInstance) -> str:
    """The study's storage in the instance's own database (see TuningConfig.storage)."""
    pg_url = getattr(instance.run_storage, "postgres_url", None)
    if not pg_url:
        return f"sqlite:///{Path(instance.root_directory).resolve() / 'optuna.db'}"
    import sqlalchemy

    engine = sqlalchemy.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f"CREATE SCHEMA IF NOT EXISTS {PG_SCHEMA}"))
    finally:
        engine.dispose()
    return f"{pg_url}{'&' if '?' in pg_url else '?'}options=-csearch_path%3D{PG_SCHEMA}"


def _trial_runner(context, mlflow: MlflowResource, data: dict, device, outputs: str, work_dir: Path,
                  parent_tags: dict, budget: "tuning.Budget"):
    """Trains one trial as an MLflow child run of the active (parent) run, reporting each epoch's
    valid AUC to the pruner and stopping at the study's budget (checked after every step)."""
    import optuna

    from ..lib.ctr import trainer

    def run(trial, model_config, train_config) -> float:
        def status(error: BaseException) -> str:
            if isinstance(error, tuning.BudgetSpent):  # Optuna keeps its AUC so far when it finished an epoch
                mlflow.set_tag("optuna.state", "STOPPED_AT_BUDGET")
                mlflow.set_tag("optuna.pruned", str(error))
                return "KILLED"
            if isinstance(error, optuna.TrialPruned):
                mlflow.set_tag("optuna.state", "PRUNED")
                mlflow.set_tag("optuna.pruned", str(error))
                return "KILLED"
            mlflow.set_tag("error", redact(f"{type(error).__name__}: {error}")[:5000])
            return "FAILED"

        logged: set[int] = set()
        try:
            with mlflow.start_child_run(f"trial-{trial.number}", parent_tags | {"optuna.trial": str(trial.number)},
                                        interrupted_status=status) as child:
                trial.set_user_attr("mlflow_run_id", child.info.run_id)
                mlflow.log_params({f"model.{k}": v for k, v in model_config.to_dict().items()}
                                  | {f"train.{k}": v for k, v in train_config.to_dict().items()}
                                  | {"data_fingerprint": data["fingerprint"]})

                def on_epoch_end(e) -> None:
                    mlflow.log_epochs([e], logged)
                    context.log.info(f"trial {trial.number} epoch {e.epoch}: valid AUC {e.valid_auc:.4f}")
                    tuning.report_epoch(trial, e.epoch, e.valid_auc)

                inputs = data["inputs"]
                result = trainer.train(
                    model_config, train_config, data["train"], data["valid"], inputs.item_table,
                    **inputs.model_tables(model_config), device=device,
                    checkpoint_dir=work_dir / f"trial-{trial.number}", data_fingerprint=data["fingerprint"],
                    on_epoch_end=on_epoch_end, progress=lambda epoch, step, steps: budget.check(trial, epoch))
                mlflow.log_metrics({"best_valid_auc": result.best_valid_auc})
                return result.best_valid_auc
        finally:
            output_paths.remove_tree(outputs, work_dir / f"trial-{trial.number}", "trial checkpoint folder")

    return run


def _load_data(storage: ProjectStorage, seed: int, trial_rows: int | None) -> tuple[dict, int]:
    """Train (at most ``trial_rows``, a seeded sample) and valid tensors at the data's full history
    width (a trial's max_len truncates), and the fused table's inputs (lib/ctr/inputs.py), read once
    for all trials."""
    from .training import read_model_inputs

    inputs = read_model_inputs(storage, "fused", seed, train_rows=trial_rows)
    width = inputs.history_width
    train_t, valid_t = inputs.tensors(width, settings.max_level() + 1)
    return {"train": train_t, "valid": valid_t, "inputs": inputs,
            "fingerprint": inputs.fingerprints.sample(len(train_t))}, width


@dg.asset(group_name=GROUP, **TRAINED_ON_FUSED)
def ctr_tuning(
    context: dg.AssetExecutionContext,
    config: TuningConfig,
    storage: ProjectStorage,
    compute: ComputeResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    """An Optuna study (TPE, Hyperband pruning on per-epoch valid AUC, the default config as its
    first trial) over the search space, within budget_minutes; writes the best trial as
    dcn_din_model's run config (`tuned: true` trains it on all rows). Resumes a study of the same
    name: a killed run leaves trials that are marked failed and retried."""
    budget = tuning.Budget(config.budget_minutes)  # the step's wall time, data loading included
    require_fresh_upstream(context, config)
    mlflow.check_reachable(must_exist=storage.model().exists())  # never recreate the store model.pt came from
    space = tuning.load_search_space(config.search_space)  # read only
    if config.n_trials < 1:
        raise ValueError(f"ctr_tuning config n_trials must be >= 1, got {config.n_trials}")
    if config.trial_rows is not None and config.trial_rows < 1:
        raise ValueError(f"ctr_tuning config trial_rows must be >= 1 (or null: every row), got {config.trial_rows}")
    # before anything is written: a symlinked checkpoint folder or a sqlite file outside is refused
    work_dir = output_paths.inside(storage.output_dir, storage.out("ctr_tuning", "checkpoints", config.study_name),
                                   "study checkpoint folder")
    if config.storage:
        output_paths.check_sqlite_url(config.storage, [storage.output_dir, context.instance.root_directory],
                                      "ctr_tuning config storage")
    url = config.storage or instance_storage_url(context.instance)
    study = tuning.open_study(url, config.study_name, config.seed, config.n_trials, config.pruning,
                              max_epochs=tuning.epochs_cap(space))
    context.log.info(f"study {config.study_name!r} in {redact(url)}: {tuning.counted_trials(study)} of "
                     f"{config.n_trials} trials done before this run")
    data, width = _load_data(storage, config.seed, config.trial_rows)
    tuning.check_max_len(space, width)
    device = compute.torch_device()
    tags = run_tags(context) | {"stage": "task2_tuning", "optuna.study": config.study_name}
    best_path = tuning.tuned_file(storage.output_dir)
    want = (compute.cpu_threads or None) if device.type == "cpu" else 1

    def stop_if_spent() -> None:  # a wait for cores that other steps hold counts against the budget too
        if budget.left_s() == 0:
            raise TimeoutError(f"ctr_tuning's budget of {config.budget_minutes:g} minutes ran out while it waited "
                               "for CPU cores that other steps hold (lib/cores.py): no trial ran, and the previous "
                               "best config is kept. Raise budget_minutes, or run the study once those steps are done")

    with mlflow.start_run(f"ctr_tuning_{config.study_name}", tags=tags) as parent:
        _log_study(mlflow, config, url, data["fingerprint"])
        with cpu_cores(context.log, storage.cpu_lock_dir(), want, what="ctr_tuning", poll=stop_if_spent) as cores, \
                torch_threads(cores):
            ran = tuning.run_study(
                study, space, _trial_runner(context, mlflow, data, device, storage.output_dir, work_dir, tags, budget),
                n_trials=config.n_trials, budget=budget,
                # a field neither sampled nor fixed keeps the library default (the default model's)
                base_model={"max_len": width, "level_vocab_size": settings.max_level() + 1},
                base_train={"seed": config.seed, "precision": compute.precision},
                on_trial_end=lambda study, trial: context.log.info(_trial_line(trial)))
        output_paths.remove_tree(storage.output_dir, work_dir, "study checkpoint folder")
        tuning.write_best_config(best_path, study, url)  # raises, keeping the old file, if none completed
        rows, plot = _log_best(mlflow, study, best_path)
    return dg.MaterializeResult(metadata=_study_metadata(study, rows, plot, ran, best_path, url, config) | {
        "mlflow_run_id": parent.info.run_id, "mlflow_run": mlflow.run_url(parent)})


def _trial_line(trial) -> str:
    value = "" if trial.value is None else f", valid AUC {trial.value:.4f}"
    return f"trial {trial.number}: {trial.state.name}{value} {trial.params}"


def _log_study(mlflow: MlflowResource, config: TuningConfig, url: str, data_fingerprint: str) -> None:
    """The parent run's parameters: budget, storage, seed, the search space and the data."""
    mlflow.log_params({"study_name": config.study_name, "storage": redact(url),
                       "n_trials": config.n_trials, "budget_minutes": config.budget_minutes,
                       "trial_rows": config.trial_rows,
                       "seed": config.seed, "pruning": config.pruning, "search_space": config.search_space,
                       "search_space_fingerprint": file_fingerprint(config.search_space),
                       "data_fingerprint": data_fingerprint})
    mlflow.log_files([Path(config.search_space)], "search_space")


def _log_best(mlflow: MlflowResource, study, best_path: Path) -> tuple[list[dict], bytes]:
    """The best trial's parameters and AUC, its config file and the AUC-per-trial plot, on the parent run."""
    from ..lib.plots import plot_trial_aucs

    rows, best = tuning.trial_rows(study), study.best_trial
    mlflow.log_params({f"best.{k}": v for k, v in best.params.items()} | {"best.trial": best.number})
    mlflow.log_metrics({"best_valid_auc": best.value})
    mlflow.log_files([best_path], "best_config")
    plot = plot_trial_aucs(rows)
    mlflow.log_png(plot, "trial_aucs.png")
    return rows, plot


def _study_metadata(study, rows: list[dict], plot: bytes, ran: int, best_path: Path, url: str,
                    config: TuningConfig) -> dict:
    best, states = study.best_trial, [r["state"] for r in rows]
    return {
        "best_valid_auc": dg.MetadataValue.float(best.value),
        "best_trial": best.number,
        "best_params": dg.MetadataValue.json(best.params),
        "best_config_path": dg.MetadataValue.path(str(best_path)),
        "study_name": config.study_name,
        "storage": redact(url),
        "trials_run_now": ran,
        "trials": dg.MetadataValue.md(tuning.trials_markdown(rows)),
        **{f"trials_{s.lower()}": states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")},
        "trial_aucs": png_metadata(plot, "valid AUC per trial"),
    }


defs = dg.Definitions(assets=[ctr_tuning])
