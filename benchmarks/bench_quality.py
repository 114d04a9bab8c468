"""Which config wins across worlds? Valid/test AUC of the default, every preset and given run
configs on demo data, against the generator's ceilings and a logistic-regression reference line.

For each world (``--worlds``, demo worlds v2/v3) and size (``--sizes``: small, medium): generate the
demo data once into ``--cache`` (seed 0), then train each config with the library (not Dagster:
``lib/ctr/trainer.train``, CPU, seed 0) on an item table and score valid and test rows (the test
labels are the generator's ``ground_truth/test.parquet``). ``--item-table organisers`` (default)
is the demo data's own ``item_emb_d128``: a fast, weak stand-in. ``--item-table fused`` is what
``dcn_din_model`` trains on: the Task 1 table built once per world through the real assets (tiny
CLIP fitted on the demo covers/titles, item2vec, fusion; ``bench_pipeline.build_task1``) and cached.
One JSON line per result: world, size, config, valid and test AUC, their gaps to the manifest's
ceilings (the true click probabilities; without each user's bias; v3: without each item's appeal),
wall time, epochs and the config. Every config after a world's first carries DeLong's paired
difference to it on the same valid and test rows (``valid_diff``, ``test_diff``, with standard errors).

Configs: every preset in ``mmctr_assets/deploy/presets/`` (``lib/ctr/presets.PRESETS``; ``default``
is what ``dcn_din_model`` trains with no config; ``max_len`` unset reads the whole history as
``dcn_din_model`` does), then each ``--config FILE.yaml`` (a run-config
fragment: ``ops: dcn_din_model: config: {model, train}`` or just ``{model, train}``; its name is the
file's stem, and a ``preset: NAME`` key starts from that preset). ``--only a,b`` keeps those names.
A config with ``use_item_levels: true`` reads the demo's item_feature.parquet levels
(``lib/ctr/inputs.item_levels``, as ``dcn_din_model`` does).

Reference line (``config: "logistic_regression"``): scikit-learn's LogisticRegression on nine
features a user would fit first: item and user click rates (logits, smoothed towards the mean rate)
and log counts from the training rows (out of fold on training rows: ``lib/ctr/statistics.py``, what
``use_statistics_features`` gives a model), likes/views levels, history
length, and the share of the whole / the last 5 history items sharing a tag with the target.

    .venv/bin/python benchmarks/bench_quality.py [--worlds v2,v3] [--sizes small,medium]
        [--item-table organisers|fused] [--only default,dcn_din] [--config extra.yaml ...] [--no-lr]
        [--max-epochs N] [--threads N] [--batch-size 512]
        [--tune N [--search-space S.yaml] [--no-pruning] [--budget-minutes M]]

``--tune N``: also an Optuna study of N trials per world (``lib/ctr/tuning``, what ``ctr_tuning``
runs, without Dagster or MLflow; base = the default preset, i.e. the library defaults, and the first
trial; search space: the demo space for small data, the default space for medium, or
``--search-space``), Hyperband-pruned on per-epoch valid AUC unless ``--no-pruning``, within
``--budget-minutes`` if given (a running trial is stopped at it). One line ``config: "tuned"``: the
best trial's valid AUC, that model's test AUC, the default trial's valid AUC, trials pruned or
stopped at the budget, and the study's wall time beside its budget.

Small data needs ``--batch-size 512`` (as ``make demo``'s run config): at the configs' own 4096 an
epoch of its 20k training rows is 5 steps, and early stopping ends most runs before they learn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import emit, peak_mb  # noqa: E402

from mmctr_assets.lib.ctr.statistics import FEATURES as STATISTICS_FEATURES  # noqa: E402

CEILINGS = ("", "_without_user_bias", "_without_item_appeal")


# ---------------------------------------------------------------------------------------------
# Data


def demo_data(cache: Path, world: str, size: str, seed: int = 0) -> Path:
    """The demo dataset of (world, size, seed), generated once into ``cache``."""
    from mmctr_assets.lib.data import demo

    root = cache / f"demo_{world}_{size}_seed{seed}"
    if not (root / "ground_truth" / "manifest.json").exists():
        t0 = time.perf_counter()
        demo.generate(root, size, seed, overwrite=True, progress=False, world=world)
        emit(bench="generate", world=world, size=size, seconds=round(time.perf_counter() - t0, 1))
    return root


@dataclasses.dataclass
class Dataset:
    frames: dict[str, pl.DataFrame]  # train, valid, test (test with its ground-truth label)
    emb: np.ndarray                  # (N+1, 128) organisers' embedding, row 0 padding
    tags: np.ndarray                 # (N+1, 5) item_info tags, left-padded 0
    manifest: dict
    levels: np.ndarray | None = None  # (N+1, 2) item_feature's per-item likes/views levels (use_item_levels)


def fused_table(cache: Path, root: Path) -> Path:
    """The Task 1 table (item_info_updated.parquet) of a demo dataset, built once by the real assets."""
    from bench_pipeline import build_task1, resources

    work = cache / f"task1_{root.name}"
    table = work / "outputs" / "item_info_updated.parquet"
    if not table.exists():
        build_task1(root, work, resources(root, work), fit_clip=True)
    return table


def load(root: Path, item_table: Path | None = None) -> Dataset:
    """The splits, the item table (``item_table``, default the data's own item_info) and tags."""
    data = root / "MicroLens_1M_x1"
    frames = {name: pl.read_parquet(data / f"{name}.parquet") for name in ("train", "valid", "test")}
    truth = pl.read_parquet(root / "ground_truth" / "test.parquet").select("ID", "label")
    frames["test"] = frames["test"].join(truth, on="ID", how="left", maintain_order="left")
    info = pl.read_parquet(item_table or data / "item_info.parquet").sort("item_id")
    emb = info.get_column("item_emb_d128").list.to_array(128).to_numpy().astype(np.float32)
    tags = info.get_column("item_tags")
    tags = tags.list.to_array(int(tags.list.len().max())).to_numpy().astype(np.int64)
    manifest = json.loads((root / "ground_truth" / "manifest.json").read_text())
    levels = None
    if (root / "item_feature.parquet").exists():
        from mmctr_assets.lib.ctr.inputs import item_levels
        from mmctr_assets.lib.data.microlens import MAX_LEVEL

        levels = item_levels(pl.read_parquet(root / "item_feature.parquet"), emb.shape[0] - 1, MAX_LEVEL)
    return Dataset(frames, emb, tags, manifest, levels)


def gaps(manifest: dict, valid_auc: float, test_auc: float) -> dict:
    """The ceilings the manifest has and this result's distance below each."""
    out = {}
    for split, auc in (("valid", valid_auc), ("test", test_auc)):
        for suffix in CEILINGS:
            ceiling = manifest.get(f"best_{split}_auc{suffix}")
            if ceiling is not None:
                out[f"ceiling_{split}{suffix}"] = round(ceiling, 4)
                out[f"gap_{split}{suffix}"] = round(ceiling - auc, 4)
    return out


# ---------------------------------------------------------------------------------------------
# Configs


def _sections(doc: dict, source: str) -> dict[str, dict]:
    """{model, train} from a run-config fragment (full ``ops:`` form or bare sections)."""
    from mmctr_assets.lib.ctr.presets import preset

    if "ops" in doc:
        doc = doc["ops"].get("dcn_din_model", {}).get("config", {})
    unknown = sorted(set(doc) - {"model", "train", "preset", "embedding_source"})
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; expected model:, train: (and optionally preset:)")
    base = preset(doc["preset"]) if "preset" in doc else {"model": {}, "train": {}}
    return {s: base.get(s, {}) | (doc.get(s) or {}) for s in ("model", "train")}


def configs(extra_files: list[Path]) -> dict[str, dict[str, dict]]:
    """name -> {model, train}: the presets (the default among them), then the files."""
    import yaml

    from mmctr_assets.lib.ctr.presets import PRESETS, preset

    out = {name: preset(name) for name in PRESETS}
    for path in extra_files:
        out[path.stem] = _sections(yaml.safe_load(path.read_text()) or {}, str(path))
    return out


# ---------------------------------------------------------------------------------------------
# Training


def _values(ds: Dataset, sections: dict, seed: int, max_epochs: int | None, threads: int | None,
            batch_size: int | None) -> tuple[dict, dict]:
    """Flat model/train values of a config, with the benchmark's overrides."""
    from mmctr_assets.lib.ctr.trainer import TrainConfig

    width = int(ds.frames["train"].get_column("item_seq").list.len().max())
    model_values = {"max_len": width} | sections["model"]  # unset max_len: the whole history
    train_values = {"seed": seed} | sections["train"]
    if max_epochs:
        train_values["epochs"] = min(train_values.get("epochs", TrainConfig.epochs), max_epochs)
    if threads:
        train_values["num_threads"] = threads
    if batch_size:
        train_values["batch_size"] = batch_size
    return model_values, train_values


def fit_and_score(ds: Dataset, model_config, train_config, on_epoch_end=None, progress=None,
                  keep: dict | None = None) -> dict:
    """Train one config and score it: valid AUC (best epoch), test AUC, the curve. ``keep`` (a dict)
    receives the valid and test probabilities."""
    import torch
    from sklearn.metrics import roc_auc_score

    from mmctr_assets.lib.ctr.inference import predict
    from mmctr_assets.lib.ctr.tensors import to_tensors
    from mmctr_assets.lib.ctr.trainer import train

    n_items = ds.emb.shape[0] - 1
    tensors = {k: to_tensors(f, model_config.max_len, n_items=n_items) for k, f in ds.frames.items()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(model_config, train_config, tensors["train"], tensors["valid"], ds.emb,
                       item_tags=ds.tags if model_config.use_tag_embedding else None, checkpoint_dir=tmp,
                       on_epoch_end=on_epoch_end, progress=progress,
                       item_levels=ds.levels if model_config.use_item_levels else None)
    train_s = time.perf_counter() - t0
    test_prob = predict(result.model, tensors["test"], batch_size=train_config.eval_batch_size)
    test_auc = float(roc_auc_score(ds.frames["test"].get_column("label").to_numpy(), test_prob))
    if keep is not None:
        keep.update(valid=result.valid_predictions, test=test_prob)
    valid_auc = float(result.best_valid_auc)
    return {"valid_auc": round(valid_auc, 4), "test_auc": round(test_auc, 4),
            **gaps(ds.manifest, valid_auc, test_auc),
            "train_s": round(train_s, 1), "epochs": len(result.history), "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "valid_auc_per_epoch": [round(e.valid_auc, 4) for e in result.history],
            "torch_threads": torch.get_num_threads()}


def train_one(ds: Dataset, name: str, sections: dict, seed: int, max_epochs: int | None,
              threads: int | None, batch_size: int | None = None, keep: dict | None = None) -> dict:
    from mmctr_assets.lib.ctr.model_config import ModelConfig
    from mmctr_assets.lib.ctr.trainer import TrainConfig

    model_values, train_values = _values(ds, sections, seed, max_epochs, threads, batch_size)
    model_config, train_config = ModelConfig(**model_values), TrainConfig(**train_values)
    return {**fit_and_score(ds, model_config, train_config, keep=keep),
            "model": {k: v for k, v in dataclasses.asdict(model_config).items() if k in model_values},
            "train": {k: v for k, v in dataclasses.asdict(train_config).items() if k in train_values}}


def tune(ds: Dataset, size: str, args) -> dict:
    """An Optuna study of ``args.tune`` trials over the default preset (what ctr_tuning runs: the
    default config first, Hyperband over epochs, within ``--budget-minutes``)."""
    import optuna

    from mmctr_assets.lib.ctr import presets, tuning

    budget = tuning.Budget(args.budget_minutes)

    space_file = args.search_space or REPO / "mmctr_assets" / "deploy" / "tuning" / (
        "search_space_demo.yaml" if size == "small" else "search_space.yaml")
    space = tuning.load_search_space(space_file)
    base = presets.preset("default")
    base_model, base_train = _values(ds, base, args.seed, args.max_epochs, args.threads, None)
    tuning.check_max_len(space, base_model["max_len"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = Path(tempfile.mkdtemp()) / "study.db"
    study = tuning.open_study(f"sqlite:///{storage}", "bench", args.seed, args.tune, pruning=not args.no_pruning,
                              max_epochs=tuning.epochs_cap(space, base_train))
    scores: dict[int, dict] = {}

    def runner(trial, model_config, train_config) -> float:
        scores[trial.number] = fit_and_score(
            ds, model_config, train_config, on_epoch_end=lambda e: tuning.report_epoch(trial, e.epoch, e.valid_auc),
            progress=lambda epoch, step, steps: budget.check(trial, epoch))
        return scores[trial.number]["valid_auc"]

    t0 = time.perf_counter()

    def progress(study, trial) -> None:  # one line per trial, so a study cut short still tells
        emit(bench="trial", number=trial.number, state=trial.state.name, valid_auc=trial.value,
             epochs=len(trial.intermediate_values), elapsed_s=round(time.perf_counter() - t0, 1),
             params=trial.params)

    tuning.run_study(study, space, runner, n_trials=args.tune, base_model=base_model, base_train=base_train,
                     on_trial_end=progress, budget=budget)
    states, rows = [t.state.name for t in study.trials], tuning.trial_rows(study)
    best, model, train = tuning.best_sections(study)
    default = next(r for r in rows if r["default"])
    # a best trial the budget cut has no kept model to score on test rows: its valid AUC so far only
    cut = {"valid_auc": round(best.value, 4), "test_auc": None, "epochs": len(best.intermediate_values)}
    return {**scores.get(best.number, cut), "study_s": round(time.perf_counter() - t0, 1),
            "budget_minutes": args.budget_minutes,
            "trials": len(states), "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
            "stopped_at_budget": sum(r["stopped_at_budget"] for r in rows), "pruning": not args.no_pruning,
            "default_trial_valid_auc": default["auc"], "default_trial_state": default["state"],
            "best_trial": best.number, "search_space": str(Path(space_file).relative_to(REPO)),
            "model": model, "train": train}


def paired(ds: Dataset, kept: dict, base_name: str, base: dict) -> dict:
    """DeLong's paired difference to ``base``'s AUC on the same valid and test rows, with its
    standard error: two configs' AUCs move together with the rows drawn, their difference less."""
    from mmctr_assets.lib.metrics import delong_test

    out = {"paired_with": base_name}
    for split in ("valid", "test"):
        c = delong_test(ds.frames[split].get_column("label").to_numpy(), kept[split], base[split])
        out |= {f"{split}_diff": round(c.diff, 4), f"{split}_diff_se": round(c.se, 4)}
    return out


# ---------------------------------------------------------------------------------------------
# Logistic-regression reference


def rate_features(ds: Dataset, seed: int = 0, strength: float | None = None) -> dict[str, np.ndarray]:
    """Split -> the item's and user's smoothed click rate (logit) and log count: out of fold on
    training rows, from all training rows on valid/test: ``lib/ctr/statistics.py``, which the
    models' ``use_statistics_features`` reads too."""
    from mmctr_assets.lib.ctr.statistics import DEFAULT_PRIOR_STRENGTH, TrainingStatistics

    train = ds.frames["train"]
    stats, oof = TrainingStatistics.fit(train["item_id"].to_numpy(), train["user_id"].to_numpy(),
                                        train["label"].to_numpy(), ds.emb.shape[0] - 1, seed=seed,
                                        strength=strength or DEFAULT_PRIOR_STRENGTH)
    return {"train": oof.numpy()} | {k: stats.features(ds.frames[k]["item_id"].to_numpy(),
                                                          ds.frames[k]["user_id"].to_numpy())
                                     for k in ("valid", "test")}


def _tag_overlap(frame: pl.DataFrame, tags: np.ndarray, last: int | None, chunk: int = 20_000) -> np.ndarray:
    """Share of the (last ``last``) real history items that share a non-zero tag with the target."""
    seq_all = np.stack(frame.get_column("item_seq").to_numpy()) if len(frame) else np.zeros((0, 1), int)
    target_all = frame.get_column("item_id").to_numpy()
    out = np.zeros(len(frame))
    for a in range(0, len(frame), chunk):
        seq = seq_all[a:a + chunk]
        if last is not None:
            seq = seq[:, -last:]
        tt = tags[target_all[a:a + chunk]]                            # (B, T)
        ht = tags[seq]                                                # (B, L, T)
        shared = ((ht[:, :, :, None] == tt[:, None, None, :]) & (tt[:, None, None, :] > 0)).any(axis=(2, 3))
        real = seq > 0
        out[a:a + chunk] = (shared & real).sum(1) / np.maximum(real.sum(1), 1)
    return out


def lr_features(ds: Dataset, name: str, rates: dict[str, np.ndarray]) -> np.ndarray:
    frame = ds.frames[name]
    return np.column_stack([
        rates[name],
        frame["likes_level"].to_numpy(), frame["views_level"].to_numpy(),
        frame.get_column("item_seq").list.eval(pl.element() > 0).list.sum().to_numpy(),
        _tag_overlap(frame, ds.tags, None), _tag_overlap(frame, ds.tags, 5),
    ]).astype(np.float64)


def logistic_regression(ds: Dataset, strength: float | None = None) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    rates = rate_features(ds, strength=strength)
    x = {k: lr_features(ds, k, rates) for k in ("train", "valid", "test")}
    y = {k: ds.frames[k]["label"].to_numpy() for k in x}
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x["train"], y["train"])
    auc = {k: float(roc_auc_score(y[k], model.predict_proba(x[k])[:, 1])) for k in ("valid", "test")}
    return {"valid_auc": round(auc["valid"], 4), "test_auc": round(auc["test"], 4),
            **gaps(ds.manifest, auc["valid"], auc["test"]), "train_s": round(time.perf_counter() - t0, 1),
            "features": [*STATISTICS_FEATURES, "likes_level", "views_level", "history_length", "history_tag_overlap",
                         "last5_tag_overlap"], "prior_strength": strength or "default"}


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="v2,v3")
    ap.add_argument("--sizes", default="small")
    ap.add_argument("--only", default=None, help="comma-separated config names to run (default: all; none: no config)")
    ap.add_argument("--config", type=Path, action="append", default=[],
                    help="a run-config fragment YAML (model:/train:, or ops: dcn_din_model: config:); repeatable")
    ap.add_argument("--no-lr", action="store_true", help="skip the logistic-regression reference line")
    ap.add_argument("--lr-prior-strength", type=float, action="append", default=[],
                    help="the reference line's click-rate prior strength (default: the library's); repeatable, "
                         "one line each")
    ap.add_argument("--max-epochs", type=int, default=None, help="cap every config's epochs")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="every config's training batch size (small: 512, as `make demo` trains: at 4096 an "
                         "epoch of 20k rows is 5 steps and nothing learns before early stopping)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help="data and training seed")
    ap.add_argument("--cache", type=Path, default=REPO / ".mmctr" / "bench" / "quality")
    ap.add_argument("--item-table", choices=("organisers", "fused"), default="organisers",
                    help="the demo data's own item_emb_d128 (fast stand-in) or the Task 1 fused table (real assets)")
    ap.add_argument("--tune", type=int, default=0, metavar="N", help="also an Optuna study of N trials per world")
    ap.add_argument("--search-space", type=Path, default=None, help="--tune's search space (default by size)")
    ap.add_argument("--no-pruning", action="store_true", help="--tune without the Hyperband pruner")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help="--tune's wall-time budget (ctr_tuning's budget_minutes; default: none)")
    args = ap.parse_args(argv)

    todo = configs(args.config)
    if args.only == "none":  # only the reference line and/or the study
        todo = {}
    elif args.only:
        wanted = args.only.split(",")
        missing = sorted(set(wanted) - set(todo))
        if missing:
            raise SystemExit(f"--only names {missing} are not configs; known: {sorted(todo)}")
        todo = {k: todo[k] for k in wanted}
    for world in args.worlds.split(","):
        for size in args.sizes.split(","):
            root = demo_data(args.cache, world, size, args.seed)
            ds = load(root, fused_table(args.cache, root) if args.item_table == "fused" else None)
            head = {"bench": "quality", "world": world, "size": size, "item_table": args.item_table,
                    "history_median": ds.manifest["history_length"]["median"]}
            if not args.no_lr:
                for strength in args.lr_prior_strength or [None]:
                    emit(**head, config="logistic_regression", **logistic_regression(ds, strength))
            first = None  # (name, probabilities) of the world's first config: the others' paired baseline
            for name, sections in todo.items():
                t0 = time.perf_counter()
                kept: dict = {}
                result = train_one(ds, name, sections, args.seed, args.max_epochs, args.threads,
                                   args.batch_size, keep=kept)
                result |= paired(ds, kept, *first) if first else {}
                first = first or (name, kept)
                emit(**head, config=name, **result, wall_s=round(time.perf_counter() - t0, 1),
                     peak_rss_mb=round(peak_mb()))
            if args.tune:
                emit(**head, config="tuned", **tune(ds, size, args), peak_rss_mb=round(peak_mb()))


if __name__ == "__main__":
    main()
