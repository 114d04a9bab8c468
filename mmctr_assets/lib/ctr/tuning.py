"""Choose by validation: an Optuna study over dcn_din_model's run config.

A search space is a YAML file (deploy/tuning/search_space.yaml; docs/tuning.md) whose ``params``
name fields of ModelConfig / TrainConfig with a range or a list of choices. Each trial samples one
flat ``model:`` / ``train:`` pair, trains it through a caller-supplied runner (the asset wraps
``trainer.train`` in an MLflow child run) and reports the per-epoch valid AUC to a Hyperband pruner
(successive halving over epochs: most trials stop after an epoch or three, only the best run all).

Bounded and never worse than the default: the study's first trial is the base config (the library
defaults, i.e. the default model, under the space's ``fixed``), so its best is at least that; a
space that cannot hold the default is refused. A :class:`Budget` in minutes bounds the study's wall
time: no trial starts after it, and the runner stops a running trial at it (pruned).

The study lives in an RDB storage (the Dagster instance's own database by default), so a study
survives its process: a trial left RUNNING by a kill -9 stops sending heartbeats, is marked FAIL
once its grace period has passed and is queued again with the same parameters
(``RetryHeartbeatStaleTrialCallback``); re-running with the same study name resumes it. On
Postgres several workers (k8s pods) can share one study.

The best trial is written as a run-config file that ``dcn_din_model`` reads with ``tuned: true``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
import yaml

from mmctr_assets.lib.ctr.model_config import ModelConfig
from mmctr_assets.lib.ctr.search_space import (  # noqa: F401  (the study's API: callers import them from here)
    MODEL_KEYS,
    TRAIN_KEYS,
    SearchSpace,
    SearchSpaceError,
    check_max_len,
    default_params,
    epochs_cap,
    load_search_space,
    parse_search_space,
    refuse_unknown,
    sample_config,
)
from mmctr_assets.lib.ctr.trainer import TrainConfig
from mmctr_assets.lib.io import atomic_path
from mmctr_assets.lib.redaction import redact

BEST_CONFIG_FILE = "best_run_config.yaml"
# Trials ended by the objective itself. A trial failed because its worker died (stale heartbeat)
# is retried, so it does not use up the budget.
_ERROR_ATTR = "error"
_BUDGET_ATTR = "stopped_at_budget"  # the epoch a trial was in when the study's budget ran out
_DEFAULT_ATTR = "default_config"  # the enqueued first trial


class StudyStorageError(RuntimeError):
    """The study's storage URL cannot be opened."""


class BudgetSpent(optuna.TrialPruned):
    """A running trial stopped because the study's budget is spent (see run_study for its state)."""


class Budget:
    """A study's wall-time budget in minutes (None: unbounded), counted from construction: no trial
    starts after it (``left_s``), and a runner calls ``check`` during training so a running trial
    stops at it too (``study.optimize(timeout=)`` alone lets a started trial run to its end)."""

    def __init__(self, minutes: float | None):
        if minutes is not None and not minutes > 0:
            raise ValueError(f"the study's budget must be > 0 minutes (or unset), got {minutes}")
        self.minutes = minutes
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes

    def left_s(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def check(self, trial: optuna.Trial, epoch: int) -> None:
        """Raise BudgetSpent once the budget is spent (run_study ends the trial cleanly)."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            trial.set_user_attr(_BUDGET_ATTR, epoch)
            raise BudgetSpent(f"stopped in epoch {epoch}: the study's budget of {self.minutes:g} minutes is spent")


# --------------------------------------------------------------------------- the study
def open_storage(url: str, heartbeat_interval: int = 30, grace_period: int | None = None) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats, or StudyStorageError naming the URL."""
    engine_kwargs = {"connect_args": {"connect_timeout": 5}} if url.startswith("postgres") else {}
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise StudyStorageError(f"Optuna study storage {redact(url)} is unreachable: folder {folder} does not "
                                    "exist. Create it, or set ctr_tuning's config storage to another URL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
        except Exception as e:  # sqlalchemy's OperationalError, a missing driver, a bad URL
            detail = redact(" ".join(str(e).split()))[:500]
            raise StudyStorageError(f"Optuna study storage {redact(url)} is unreachable ({type(e).__name__}: "
                                    f"{detail}). Check the URL, that the server runs and accepts this user, or "
                                    "set ctr_tuning's config storage to another URL") from None


def open_study(storage: str | optuna.storages.RDBStorage, study_name: str, seed: int, n_trials: int,
               pruning: bool = True, max_epochs: int = TrainConfig.epochs) -> optuna.Study:
    """Create the study, or load it when ``study_name`` exists (resume); maximises valid AUC."""
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if isinstance(storage, str):
        storage = open_storage(storage)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, n_trials // 3)))
    # Multi-fidelity over epochs (reported 1-based): Hyperband runs successive halving in brackets
    # whose first rung is 1, 3, 9 ... epochs; at each rung a trial goes on only while it is in the
    # best third of its bracket's trials there, so most trials cost an epoch or a few and only the
    # best run all ``max_epochs``. The first trial of a bracket always goes on (the default, first).
    pruner = (optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, max_epochs), reduction_factor=3)
              if pruning else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    fail_stale_trials(study)
    return study


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark trials whose worker stopped sending heartbeats FAIL (and queue them again)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def counted_trials(study: optuna.Study) -> int:
    """Trials that used up the budget: finished, pruned, or failed by their own error."""
    ts = optuna.trial.TrialState
    return sum(t.state in (ts.COMPLETE, ts.PRUNED) or (t.state == ts.FAIL and _ERROR_ATTR in t.user_attrs)
               for t in study.get_trials(deepcopy=False))


def report_epoch(trial: optuna.Trial, epoch: int, valid_auc: float) -> None:
    """Give the pruner this epoch's valid AUC; raises optuna.TrialPruned when it says stop (from
    trainer.train's on_epoch_end, after last.pt is written)."""
    trial.report(valid_auc, step=epoch)
    if trial.should_prune():
        raise optuna.TrialPruned(f"pruned after epoch {epoch} (valid AUC {valid_auc:.4f})")


Runner = Callable[[optuna.Trial, ModelConfig, TrainConfig], float]


def run_study(study: optuna.Study, space: SearchSpace, runner: Runner, *, n_trials: int,
              budget: Budget | None = None, base_model: Mapping[str, Any] | None = None,
              base_train: Mapping[str, Any] | None = None,
              on_trial_end: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None) -> int:
    """Run trials until the study holds ``n_trials`` counted trials (resuming counts earlier ones)
    or the ``budget`` is spent (no trial starts after it; the runner stops a running one with
    ``budget.check``: COMPLETE with its best valid AUC so far when it finished an epoch, else
    PRUNED). A new study's first trial is the base config (:func:`default_params`). A
    trial that raises is recorded FAIL with its error in user attr ``error`` and the study goes
    on. Returns the trials run now."""
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    first = default_params(space, base_model, base_train)  # refuses a space without the default first
    remaining = n_trials - counted_trials(study)
    left_s = budget.left_s() if budget is not None else None
    if remaining <= 0 or left_s == 0:
        return 0
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(first, user_attrs={_DEFAULT_ATTR: True})

    def objective(trial: optuna.Trial) -> float:
        model_values, train_values = sample_config(trial, space, base_model, base_train)
        trial.set_user_attr("model", model_values)
        trial.set_user_attr("train", train_values)
        try:
            value = runner(trial, ModelConfig(**model_values), TrainConfig(**train_values))
            if not math.isfinite(value):
                raise FloatingPointError(f"the trial's valid AUC is {value}")
            return value
        except BudgetSpent:
            # a trial cut by the budget after a finished epoch is a lower-fidelity measurement, as at
            # a Hyperband rung: it completes with its best valid AUC so far, so a study whose budget
            # ends inside its first (default) trial still returns it. Before any epoch: pruned.
            (frozen,) = [t for t in study.get_trials(deepcopy=False) if t.number == trial.number]
            if frozen.intermediate_values:
                return max(frozen.intermediate_values.values())
            raise
        except optuna.TrialPruned:
            raise
        except Exception as e:
            trial.set_user_attr(_ERROR_ATTR, redact(f"{type(e).__name__}: {e}")[:2000])
            raise

    ran = []

    def stop_at_budget(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        ran.append(trial.number)
        if on_trial_end is not None:
            on_trial_end(study, trial)
        if counted_trials(study) >= n_trials:  # other workers count too
            study.stop()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(objective, n_trials=remaining, timeout=left_s,
                       catch=(Exception,), callbacks=[stop_at_budget], gc_after_trial=True)
    return len(ran)


# --------------------------------------------------------------------------- results
def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, AUC (a pruned trial's last reported one), epochs, params."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        steps = t.intermediate_values
        value = t.value if t.value is not None else (steps[max(steps)] if steps else None)
        rows.append({"number": t.number, "state": t.state.name, "auc": value, "epochs": len(steps),
                     "params": dict(t.params), "error": t.user_attrs.get(_ERROR_ATTR, ""),
                     "default": bool(t.user_attrs.get(_DEFAULT_ATTR)),
                     "stopped_at_budget": _BUDGET_ATTR in t.user_attrs})
    return rows


def trials_markdown(rows: list[dict[str, Any]], max_rows: int = 100) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial", "state", "valid AUC", "epochs", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    for r in rows[-max_rows:]:
        auc = "" if r["auc"] is None else f"{r['auc']:.4f}"
        state = r["state"] + (f" ({r['error'][:60]})" if r["error"] else " (budget)" if r["stopped_at_budget"]
                              else "") + (" (default)" if r["default"] else "")
        lines.append("| " + " | ".join([str(r["number"]), state.replace("|", "/"), auc, str(r["epochs"]),
                                         *(cell(r["params"].get(k)) for k in keys)]) + " |")
    return "\n".join(lines)


def best_sections(study: optuna.Study) -> tuple[optuna.trial.FrozenTrial, dict, dict]:
    """(best trial, its model dict, its train dict); a clear error when no trial completed."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        errors = sorted({t.user_attrs[_ERROR_ATTR] for t in study.get_trials(deepcopy=False)
                         if _ERROR_ATTR in t.user_attrs})
        budget = sum(_BUDGET_ATTR in t.user_attrs for t in study.get_trials(deepcopy=False))
        raise RuntimeError(f"study {study.study_name!r} has no completed trial, so no best config"
                           + (f"; trial errors: {errors[:3]}" if errors else "")
                           + (f"; {budget} trial(s) stopped at the study's wall-time budget: raise budget_minutes "
                              "or lower trial_rows" if budget else "") + ". Fix the search space or the "
                           "data and run ctr_tuning again (it resumes the study)")
    best = study.best_trial
    return best, dict(best.user_attrs["model"]), dict(best.user_attrs["train"])


def write_best_config(path: str | Path, study: optuna.Study, storage_url: str,
                      drop_train: tuple[str, ...] = ("precision",)) -> Path:
    """The best trial as a dcn_din_model run config (ops: dcn_din_model: config: model/train),
    written atomically. ``precision`` is left to the compute resource."""
    best, model, train = best_sections(study)
    train = {k: v for k, v in train.items() if k not in drop_train}
    header = (f"# Best trial of Optuna study {study.study_name!r} ({redact(storage_url)}): trial {best.number}, "
              f"valid AUC {best.value:.6f}.\n# dcn_din_model trains it with `tuned: true`, or pass this file "
              "as its run config (dagster asset materialize --config).\n")
    body = {"ops": {"dcn_din_model": {"config": {"model": model, "train": train}}}}
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(header + yaml.safe_dump(body, sort_keys=True))
    return path


def tuned_file(output_dir: str | Path) -> Path:
    """Where ctr_tuning writes, and dcn_din_model's ``tuned: true`` reads, the best config."""
    return Path(output_dir) / "ctr_tuning" / BEST_CONFIG_FILE


def tuned_sections(path: str | Path, model: dict[str, Any], train: dict[str, Any],
                   keep_model: set[str] = frozenset(), keep_train: set[str] = frozenset()) -> tuple[dict, dict]:
    """dcn_din_model's ``tuned: true``: the best config in ``path`` over the run config's
    sections, except the keys in ``keep_*`` (set explicitly in the run config, they win)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dcn_din_model config tuned: true reads {path}, which does not exist: materialise "
                                "ctr_tuning first (`dagster asset materialize -m mmctr_assets --select ctr_tuning`), "
                                "or set tuned: false")
    try:
        section = yaml.safe_load(path.read_text())["ops"]["dcn_din_model"]["config"]
        tuned_model, tuned_train = dict(section.get("model") or {}), dict(section.get("train") or {})
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a ctr_tuning best config (ops: dcn_din_model: config: model/train): "
                         f"{type(e).__name__}: {e}. Materialise ctr_tuning again") from None
    for name, values, allowed in (("model", tuned_model, MODEL_KEYS), ("train", tuned_train, TRAIN_KEYS)):
        refuse_unknown(values, allowed, f"{name} key(s)", str(path))
    return ({**model, **{k: v for k, v in tuned_model.items() if k not in keep_model}},
            {**train, **{k: v for k, v in tuned_train.items() if k not in keep_train}})
