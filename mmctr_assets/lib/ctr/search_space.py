"""A search space for ctr_tuning: a YAML file (deploy/tuning/search_space.yaml; docs/tuning.md)
whose ``params`` name fields of ModelConfig / TrainConfig with a range or a list of choices (a
``when`` makes one depend on an earlier choice) and whose ``fixed`` sets fields for every trial.
Parsed and checked before any trial runs, every error naming the file and the field."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import yaml

from mmctr_assets.lib.ctr.model_config import TRAINABLE_TABLE_SWITCHES, ModelConfig
from mmctr_assets.lib.ctr.trainer import TrainConfig

# Set by the platform, not searchable: the item table sets embedding_dim, the compute resource
# precision.
NOT_SEARCHABLE = frozenset({"embedding_dim", "precision"})
MODEL_KEYS = frozenset(f.name for f in dataclasses.fields(ModelConfig)) - NOT_SEARCHABLE
TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig)) - NOT_SEARCHABLE
SPACE_KEYS = ("params", "fixed", "description")
PARAM_KEYS = ("choices", "low", "high", "log", "step", "type", "when")


class SearchSpaceError(ValueError):
    """A search-space file that cannot be used; the message names the file and the field."""


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


def refuse_unknown(keys, allowed, what: str, source: str) -> None:
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
    refuse_unknown(spec, PARAM_KEYS, f"key(s) in params.{name}", source)
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
    refuse_unknown(raw, SPACE_KEYS, "top-level key(s)", source)
    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, Mapping) or not params_raw:
        raise SearchSpaceError(f"{source}: the search space is empty: list at least one parameter under params:, "
                               f"e.g. params: {{lr: {{low: 1.0e-4, high: 3.0e-3, log: true}}}}")
    fixed = dict(raw.get("fixed") or {})
    refuse_unknown(fixed, MODEL_KEYS | TRAIN_KEYS, "parameter(s) under fixed", source)
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
    model = sections["model"]
    if "embedding_regularizer" not in set(space.fixed) | set(values) and not any(
            model.get(k, getattr(ModelConfig, k)) for k in TRAINABLE_TABLE_SWITCHES):
        model["embedding_regularizer"] = 0.0  # the default's regulariser has no table left to act on
    return model, sections["train"]


def check_max_len(space: SearchSpace, history_width: int) -> None:
    """Refuse before any trial runs a history length the data does not hold."""
    p = next((p for p in space.params if p.name == "max_len"), None)
    longest = space.fixed.get("max_len", 0) if p is None else max(p.choices) if p.choices else p.high
    if longest > history_width:
        raise SearchSpaceError(f"{space.source}: max_len up to {longest}, but the training histories hold "
                               f"{history_width} positions; keep max_len <= {history_width}")


def _holds(p: Param, value: Any) -> bool:
    if p.choices is not None:
        return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in p.choices)
    if value is None or isinstance(value, bool) or not p.low <= value <= p.high:
        return False
    return not p.is_int or (value == int(value) and (value - p.low) % (p.step or 1) == 0)


def default_params(space: SearchSpace, base_model: Mapping[str, Any] | None = None,
                   base_train: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The space's parameters at the base config's values (with ``fixed`` over it): the study's first
    trial. SearchSpaceError when the space cannot hold one of them: a study that cannot sample the
    default could return something worse than it."""
    fixed = {s: {k: v for k, v in space.fixed.items() if _section(k) == s} for s in ("model", "train")}
    resolved = {"model": ModelConfig(**(dict(base_model or {}) | fixed["model"])).to_dict(),
                "train": TrainConfig(**(dict(base_train or {}) | fixed["train"])).to_dict()}
    values: dict[str, Any] = {}
    for p in space.params:
        if not p.active(values):
            continue
        value = resolved[p.section][p.name]
        if not _holds(p, value):
            raise SearchSpaceError(
                f"{space.source}: params.{p.name} ({space.describe()[p.name]}) does not hold the default's "
                f"{p.name}={value!r}. The study's first trial is the default config, so that it never returns "
                "something worse: add the value to the space (or set the parameter under fixed)")
        values[p.name] = value
    return values


def epochs_cap(space: SearchSpace, base_train: Mapping[str, Any] | None = None) -> int:
    """The most epochs a trial can run: the pruner's largest rung."""
    p = next((p for p in space.params if p.name == "epochs"), None)
    if p is not None:
        return int(max(p.choices) if p.choices else p.high)
    return int(space.fixed.get("epochs", dict(base_train or {}).get("epochs", TrainConfig.epochs)))
