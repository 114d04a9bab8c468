"""Choose by validation: an Optuna study over dcn_din_model's run config.

A search space is a YAML file (deploy/tuning/search_space.yaml; docs/tuning.md) whose ``params``
name fields of ModelConfig / TrainConfig with a range or a list of choices. Each trial samples one
flat ``model:`` / ``train:`` pair, trains it through a caller-supplied runner (the asset wraps
``trainer.train`` in an MLflow child run) and reports the per-epoch valid AUC, so the pruner can
stop a trial that trails the median of earlier ones.

The study lives in an RDB storage (the Dagster instance's own database by default), so a study
survives its process: a trial left RUNNING by a kill -9 stops sending heartbeats, is marked FAIL
once its grace period has passed and is queued again with the same parameters
(``RetryHeartbeatStaleTrialCallback``); re-running with the same study name resumes it. On
Postgres several workers (k8s pods) can share one study.

The best trial is written as a run-config file that ``dcn_din_model`` reads with ``tuned: true``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
import yaml

from mmctr_assets.lib.ctr import presets
from mmctr_assets.lib.ctr.model_config import ModelConfig
from mmctr_assets.lib.ctr.trainer import TrainConfig
from mmctr_assets.lib.io import atomic_path
from mmctr_assets.lib.redaction import redact

# Set by the platform, not searchable: the item table sets embedding_dim, the compute resource
# precision.
NOT_SEARCHABLE = frozenset({"embedding_dim", "precision"})
MODEL_KEYS = frozenset(f.name for f in dataclasses.fields(ModelConfig)) - NOT_SEARCHABLE
TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig)) - NOT_SEARCHABLE
SPACE_KEYS = ("params", "fixed", "description")
PARAM_KEYS = ("choices", "low", "high", "log", "step", "type", "when")
BEST_CONFIG_FILE = "best_run_config.yaml"
# Trials ended by the objective itself. A trial failed because its worker died (stale heartbeat)
# is retried, so it does not use up the budget.
_ERROR_ATTR = "error"


class SearchSpaceError(ValueError):
    """A search-space file that cannot be used; the message names the file and the field."""


class StudyStorageError(RuntimeError):
    """The study's storage URL cannot be opened."""


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    section: str  # "model" or "train"
    choices: tuple | None = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    is_int: bool = False
    when: tuple[dict[str, tuple], ...] = ()  # any of these all-of conditions; () = always

    def active(self, values: Mapping[str, Any]) -> bool:
        return not self.when or any(all(values.get(k) in allowed for k, allowed in cond.items())
                                    for cond in self.when)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    fixed: dict[str, Any]
    source: str  # the file it came from, for messages

    def describe(self) -> dict[str, str]:
        def one(p: Param) -> str:
            if p.choices is not None:
                return f"one of {list(p.choices)}"
            return f"{p.low}..{p.high}" + (" (log)" if p.log else "")
        return {p.name: one(p) for p in self.params}


def _section(key: str) -> str | None:
    return "model" if key in MODEL_KEYS else "train" if key in TRAIN_KEYS else None


def _number(value: Any, where: str) -> float | int:
    # YAML 1.1 reads 1e-5 (no dot) as a string: accept the numbers a person writes
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SearchSpaceError(f"{where} must be a number, got {value!r}")
    return value


def _unknown(keys, allowed, what: str, source: str) -> None:
    extra = [k for k in keys if k not in allowed]
    if extra:
        raise SearchSpaceError(f"{source}: unknown {what} {extra}; allowed: {sorted(allowed)}")


def _parse_param(name: str, spec: Any, earlier: dict[str, Param], source: str) -> Param:
    where = f"{source}: params.{name}"
    section = _section(name)
    if section is None:
        raise SearchSpaceError(f"{source}: unknown parameter {name!r} under params; allowed: "
                               f"ModelConfig fields {sorted(MODEL_KEYS)} and TrainConfig fields {sorted(TRAIN_KEYS)}")
    if not isinstance(spec, Mapping):
        raise SearchSpaceError(f"{where} must be a mapping such as {{choices: [...]}} or {{low: .., high: ..}}, "
                               f"got {spec!r}")
    _unknown(spec, PARAM_KEYS, f"key(s) in params.{name}", source)
    when = _parse_when(spec.get("when"), earlier, where)
    if "choices" in spec:
        if {"low", "high", "log", "step"} & set(spec):
            raise SearchSpaceError(f"{where}: give either choices or low/high, not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SearchSpaceError(f"{where}.choices must be a non-empty list, got {choices!r}")
        # Optuna stores categorical choices as JSON scalars: lists (layer sizes) become tuples here
        # and are refused, so that a stored study stays readable
        bad = [c for c in choices if not (c is None or isinstance(c, bool | int | float | str))]
        if bad:
            raise SearchSpaceError(f"{where}.choices must be scalars (numbers, strings, true/false), got {bad}")
        return Param(name, section, choices=tuple(choices), when=when)
    if "low" not in spec or "high" not in spec:
        raise SearchSpaceError(f"{where} needs choices: [...] or both low and high")
    low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
    kind = spec.get("type", "int" if isinstance(low, int) and isinstance(high, int) else "float")
    if kind not in ("int", "float"):
        raise SearchSpaceError(f"{where}.type must be int or float, got {kind!r}")
    log, step = bool(spec.get("log", False)), spec.get("step")
    if not low < high:
        raise SearchSpaceError(f"{where}: low ({low}) must be below high ({high}); for a constant use fixed:")
    if log and low <= 0:
        raise SearchSpaceError(f"{where}: a log-scale range needs low > 0, got {low}")
    if step is not None:
        step = _number(step, f"{where}.step")
        if step <= 0 or log:
            raise SearchSpaceError(f"{where}.step must be > 0 and cannot be combined with log: true")
    if kind == "int":
        if low != int(low) or high != int(high):
            raise SearchSpaceError(f"{where}: an int range needs whole-number bounds, got {low}..{high}")
        low, high, step = int(low), int(high), (int(step) if step is not None else None)
    return Param(name, section, low=low, high=high, log=log, step=step, is_int=kind == "int", when=when)


def _parse_when(when: Any, earlier: dict[str, Param], where: str) -> tuple[dict[str, tuple], ...]:
    if when is None:
        return ()
    conds = [when] if isinstance(when, Mapping) else when
    if not isinstance(conds, list) or not conds or not all(isinstance(c, Mapping) and c for c in conds):
        raise SearchSpaceError(f"{where}.when must be a mapping {{param: value(s)}} or a list of them (any holds)")
    parsed = []
    for cond in conds:
        one = {}
        for key, allowed in cond.items():
            if key not in earlier or earlier[key].choices is None:
                raise SearchSpaceError(f"{where}.when refers to {key!r}: it must be a parameter with choices "
                                       f"listed above it (earlier: {sorted(earlier)})")
            allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
            wrong = [a for a in allowed if a not in earlier[key].choices]
            if wrong:
                raise SearchSpaceError(f"{where}.when: {wrong} not among {key}'s choices {list(earlier[key].choices)}")
            one[key] = allowed
        parsed.append(one)
    return tuple(parsed)


def parse_search_space(raw: Any, source: str = "<search space>") -> SearchSpace:
    """Validate a loaded search-space document; every error names ``source`` and the field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SearchSpaceError(f"{source}: a search space is a mapping with keys {list(SPACE_KEYS)}, got {raw!r}")
    _unknown(raw, SPACE_KEYS, "top-level key(s)", source)
    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, Mapping) or not params_raw:
        raise SearchSpaceError(f"{source}: the search space is empty: list at least one parameter under params:, "
                               f"e.g. params: {{lr: {{low: 1.0e-4, high: 3.0e-3, log: true}}}}")
    fixed = dict(raw.get("fixed") or {})
    _unknown(fixed, MODEL_KEYS | TRAIN_KEYS, "parameter(s) under fixed", source)
    params: dict[str, Param] = {}
    for name, spec in params_raw.items():
        if name in fixed:
            raise SearchSpaceError(f"{source}: {name!r} is both under fixed and under params; keep one")
        params[name] = _parse_param(name, spec, params, source)
    return SearchSpace(tuple(params.values()), fixed, source)


def load_search_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise SearchSpaceError(f"search space file {path} does not exist; the shipped ones are in "
                               "mmctr_assets/deploy/tuning/ (docs/tuning.md describes the format)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SearchSpaceError(f"{path} is not valid YAML: {e}") from None
    return parse_search_space(raw, str(path))


def sample_config(trial: optuna.Trial, space: SearchSpace, base_model: Mapping[str, Any] | None = None,
                  base_train: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
    """One trial's flat (model, train) dicts: base values, then fixed, then the sampled params
    (a param whose ``when`` does not hold is not sampled and keeps the base/default value)."""
    sections = {"model": dict(base_model or {}), "train": dict(base_train or {})}
    for key, value in space.fixed.items():
        sections[_section(key)][key] = value
    values: dict[str, Any] = {}
    for p in space.params:
        if p.active(values):
            values[p.name] = sections[p.section][p.name] = p.suggest(trial)
    model = presets.without_inapplicable_defaults(sections["model"], set(space.fixed) | set(values))
    return model, sections["train"]


def check_max_len(space: SearchSpace, history_width: int) -> None:
    """Refuse before any trial runs a history length the data does not hold."""
    p = next((p for p in space.params if p.name == "max_len"), None)
    longest = space.fixed.get("max_len", 0) if p is None else max(p.choices) if p.choices else p.high
    if longest > history_width:
        raise SearchSpaceError(f"{space.source}: max_len up to {longest}, but the training histories hold "
                               f"{history_width} positions; keep max_len <= {history_width}")


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
               pruning: bool = True) -> optuna.Study:
    """Create the study, or load it when ``study_name`` exists (resume); maximises valid AUC."""
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if isinstance(storage, str):
        storage = open_storage(storage)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, n_trials // 3)))
    # A trial is pruned as soon as its best valid AUC so far trails the median of the completed
    # trials at the same epoch, from its first epoch on (epochs are reported 1-based), once two
    # trials have completed. Waiting for epoch 2 would not spare the slow starters either
    # (docs/tuning.md) and costs every pruned trial one more epoch.
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if pruning
              else optuna.pruners.NopPruner())
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
              timeout_minutes: float | None = None, base_model: Mapping[str, Any] | None = None,
              base_train: Mapping[str, Any] | None = None,
              on_trial_end: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None) -> int:
    """Run trials until the study holds ``n_trials`` counted trials (resuming counts earlier ones)
    or ``timeout_minutes`` pass (checked between trials). A trial that raises is recorded FAIL with
    its error in user attr ``error`` and the study goes on. Returns the trials run now."""
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if timeout_minutes is not None and timeout_minutes <= 0:
        raise ValueError(f"timeout_minutes must be > 0 (or unset), got {timeout_minutes}")
    remaining = n_trials - counted_trials(study)
    if remaining <= 0:
        return 0

    def objective(trial: optuna.Trial) -> float:
        model_values, train_values = sample_config(trial, space, base_model, base_train)
        trial.set_user_attr("model", model_values)
        trial.set_user_attr("train", train_values)
        try:
            value = runner(trial, ModelConfig(**model_values), TrainConfig(**train_values))
            if not math.isfinite(value):
                raise FloatingPointError(f"the trial's valid AUC is {value}")
            return value
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
        study.optimize(objective, n_trials=remaining, timeout=timeout_minutes * 60 if timeout_minutes else None,
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
                     "params": dict(t.params), "error": t.user_attrs.get(_ERROR_ATTR, "")})
    return rows


def trials_markdown(rows: list[dict[str, Any]], max_rows: int = 100) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial", "state", "valid AUC", "epochs", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    for r in rows[-max_rows:]:
        auc = "" if r["auc"] is None else f"{r['auc']:.4f}"
        state = r["state"] + (f" ({r['error'][:60]})" if r["error"] else "")
        lines.append("| " + " | ".join([str(r["number"]), state.replace("|", "/"), auc, str(r["epochs"]),
                                         *(cell(r["params"].get(k)) for k in keys)]) + " |")
    return "\n".join(lines)


def best_sections(study: optuna.Study) -> tuple[optuna.trial.FrozenTrial, dict, dict]:
    """(best trial, its model dict, its train dict); a clear error when no trial completed."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        errors = sorted({t.user_attrs[_ERROR_ATTR] for t in study.get_trials(deepcopy=False)
                         if _ERROR_ATTR in t.user_attrs})
        raise RuntimeError(f"study {study.study_name!r} has no completed trial, so no best config"
                           + (f"; trial errors: {errors[:3]}" if errors else "") + ". Fix the search space or the "
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
        _unknown(values, allowed, f"{name} key(s)", str(path))
    return ({**model, **{k: v for k, v in tuned_model.items() if k not in keep_model}},
            {**train, **{k: v for k, v in tuned_train.items() if k not in keep_train}})
