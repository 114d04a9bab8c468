"""End-to-end quality and full-size cost of the real asset graph (issue 4, items 1 and 3).

``--quality``: demo data ``medium`` (10k items, 200k train rows) with a tiny random-weight CLIP
(``--fit-clip``: fitted on the demo covers/titles first),
raw -> clip_embeddings (all shards, one run) -> item2vec -> fused, then dcn_din_model trained
through Dagster once per embedding source (content, item2vec, fused, organisers) with the same
seed, config and epoch budget. One JSON line per training: valid AUC, the ceiling
``best_valid_auc`` of the generator's true click probabilities, the gap (goal for fused: <= 0.02),
epochs, seconds and the MLflow run id. A first line gives a same-data reference: a model told
every item's true topic (and, second line, each user's true click bias), i.e. how much of the
gap one row's features leave unexplainable.
``--variants`` adds a table of model/training variants (trainable id/tag embeddings, fine-tuning,
lr, batch size, history length, width) on chosen sources so defaults can be picked from
measurements. Training settings: TrainConfig defaults with seed 0 and at most 10 epochs.

``--full``: on full-size data (``--data-dir``, e.g. ``mmctr-demo-data --size full --out DIR``), the
whole graph, each step in a fresh subprocess as the multiprocess executor runs it (wall time and
peak RSS per step, goal: every step < 16 GiB): raw, clip_embeddings over every item with the
stand-in tiny CLIP (``--clip-model DIR`` to use another, e.g. one fitted with ``mmctr-tiny-clip
--fit-on``), item2vec, fusion, ``--epochs`` epochs of dcn_din_model on the fused table (default 1;
10 is the full-size command's budget) and the predictions over the test rows.

    .venv/bin/python benchmarks/bench_pipeline.py --quality [--fit-clip] [--variants [NAME,...]] [--sources fused,...]
        [--medium-dir DIR]
    .venv/bin/python benchmarks/bench_pipeline.py --full --data-dir DIR [--epochs 1] [--clip-model DIR]

Dagster outputs and generated data go to ``--work-dir`` (default: a temp dir) and are deleted
unless ``--keep``; the MLflow sqlite store each mode prints is kept, so the run ids stay usable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import emit, peak_mb  # noqa: E402

SOURCES = ("content", "item2vec", "fused", "organisers")
GOAL_FUSED_GAP = 0.02
GOAL_FULL_PEAK_MB = 16 * 1024
# Trainer settings shared by every quality run: TrainConfig defaults (lr 2e-3, batch 4096,
# max_len 64, early stopping) with a fixed seed and epoch budget.
QUALITY_TRAIN = {"seed": 0, "epochs": 10}
VARIANTS: dict[str, dict] = {
    "default": {},
    # the DIN paper's linear attention weights without the extra scalars (the defaults until
    # the history-match features and item frequency were measured here), then each one alone
    "din_linear": {"attention_output_activation": "linear", "history_match_features": False,
                   "use_item_frequency": False},
    "sigmoid_only": {"history_match_features": False, "use_item_frequency": False},
    "no_item_frequency": {"use_item_frequency": False},
    "no_match_features": {"history_match_features": False},
    "id_emb": {"use_id_embedding": True},
    "tag_emb": {"use_tag_embedding": True},
    "id_tag_emb": {"use_id_embedding": True, "use_tag_embedding": True},
    "finetune": {"finetune_item_embeddings": True},
    "lr_3e-3": {"lr": 3e-3},
    "batch_1024": {"batch_size": 1024},
    "max_len_100": {"max_len": 100},
    "id_tag_lr_3e-3": {"use_id_embedding": True, "use_tag_embedding": True, "lr": 3e-3},
    # trainable tables need more steps: the same tables with 4x the steps per epoch
    "id_emb_batch_1024": {"use_id_embedding": True, "batch_size": 1024},
    "tag_emb_batch_1024": {"use_tag_embedding": True, "batch_size": 1024},
    "id_tag_batch_1024": {"use_id_embedding": True, "use_tag_embedding": True, "batch_size": 1024},
    "tag_lr_3e-3": {"use_tag_embedding": True, "lr": 3e-3},
    "dropout_0.3": {"dropout": 0.3},
    "deep_256_128": {"deep_units": [256, 128]},
    "cross_v2": {"cross_version": "v2"},
    "lr_3e-3_batch_1024": {"lr": 3e-3, "batch_size": 1024},
}


def _flat_preset(name: str, **changes) -> dict:
    from mmctr_assets.lib.ctr.presets import preset

    p = preset(name)
    return p["model"] | p["train"] | changes


# Issue 12: one preset per family, then each option of the default family off / on.
FAMILY_VARIANTS: dict[str, dict] = {
    "preset_dcn_din": _flat_preset("dcn_din"),
    "preset_transformer_dcnv2": _flat_preset("transformer_dcnv2"),
    "preset_din": _flat_preset("din"),
    "dcn_din_no_position": _flat_preset("dcn_din", position="none"),
    "dcn_din_position_key_value": _flat_preset("dcn_din", position="key_value"),
    "dcn_din_no_user": _flat_preset("dcn_din", use_user_embedding=False, embedding_regularizer=0.0),
    "dcn_din_user_no_reg": _flat_preset("dcn_din", embedding_regularizer=0.0),
    "dcn_din_id_reg": _flat_preset("dcn_din", use_id_embedding=True),
    "dcn_din_id_no_reg": _flat_preset("dcn_din", use_id_embedding=True, embedding_regularizer=0.0),
    "dcn_din_lr_factor_0.1": _flat_preset("dcn_din", lr_factor=0.1, early_stopping_patience=2),
    "transformer_no_position": _flat_preset("transformer_dcnv2", position="none"),
    "transformer_low_rank": _flat_preset("transformer_dcnv2", cross_rank=32),
    "seed_default_max_len_64": {"max_len": 64, "position": "none"},
}
VARIANTS |= FAMILY_VARIANTS


def resources(data_dir: Path, work: Path) -> dict:
    from mmctr_assets.resources import ComputeResource, MlflowResource, ProjectStorage

    return {
        "storage": ProjectStorage(data_dir=str(data_dir), output_dir=str(work / "outputs")),
        "compute": ComputeResource(device="cpu", num_workers=1),
        "mlflow": MlflowResource(tracking_uri=f"sqlite:///{work / 'mlflow.db'}", experiment_name="bench_pipeline"),
    }


def materialise(assets: list, res: dict, run_config: dict | None = None, **kwargs):
    import dagster as dg

    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    t0 = time.perf_counter()
    result = dg.materialize(assets, resources=res, instance=dg.DagsterInstance.ephemeral(),
                            run_config=quiet | (run_config or {}), **kwargs)
    if not result.success:
        raise RuntimeError(f"materialising {[a.key.to_user_string() for a in assets]} failed")
    return result, time.perf_counter() - t0


def train_config(source: str, overrides: dict) -> dict:
    """dcn_din_model run config: the flat settings above sorted into its model/train sections."""
    from mmctr_assets.lib.ctr.model_config import ModelConfig

    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    flat = QUALITY_TRAIN | overrides
    config = {"embedding_source": source,
              "model": {k: v for k, v in flat.items() if k in model_keys},
              "train": {k: v for k, v in flat.items() if k not in model_keys}}
    return {"ops": {"dcn_din_model": {"config": config}}}


# ------------------------------------------------------------------------------------ quality

def build_task1(data_dir: Path, work: Path, res: dict, fit_clip: bool, item2vec_config: dict | None = None) -> None:
    from mmctr_assets.defs import embeddings as task1
    from mmctr_assets.defs.common import clip_shards
    from mmctr_assets.defs.raw import raw_assets
    from mmctr_assets.lib.embeddings.tiny_clip import build_tiny_clip, fit_on_demo_data

    clip_dir = build_tiny_clip(work / "tiny-clip", seed=0)
    fit = {"clip": "tiny random-weight CLIP"}
    if fit_clip:
        t0 = time.perf_counter()
        info = fit_on_demo_data(clip_dir, data_dir, seed=0)
        fit = {"clip": "tiny CLIP fitted on the demo covers/titles", "clip_fit_s": round(time.perf_counter() - t0, 1),
               "clip_fit_pairs": info["pairs"], "clip_fit_epochs": info["epochs"]}
    _, raw_s = materialise(raw_assets, res)
    keys = clip_shards.get_partition_keys()
    _, clip_s = materialise(
        [task1.clip_embeddings], res, run_config={"ops": {"clip_embeddings": {"config": {"model": str(clip_dir)}}}},
        tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]})
    _, i2v_s = materialise([task1.item2vec_embeddings], res,
                           run_config={"ops": {"item2vec_embeddings": {"config": item2vec_config or {}}}})
    _, fused_s = materialise([task1.fused_item_embeddings], res)
    emit(bench="task1_build", raw_s=round(raw_s, 1), clip_s=round(clip_s, 1), item2vec_s=round(i2v_s, 1),
         fused_s=round(fused_s, 1), clip_shards=len(keys), item2vec_config=item2vec_config or {}, **fit)


def topic_oracle_aucs(data_dir: Path) -> dict[str, float]:
    """Valid AUC of a model told every item's TRUE topic (ground_truth/items.parquet): what one row's
    history (share in the target's topic, and that share weighted by the world's recency decay),
    levels and item popularity allow, so the ceiling gap splits into data vs model. The second
    figure also gets each user's TRUE click bias, which no model can learn from a few rows."""
    import numpy as np
    import polars as pl
    from sklearn.ensemble import HistGradientBoostingClassifier

    from mmctr_assets.lib.metrics import auc

    truth = data_dir / "ground_truth"
    items = pl.read_parquet(truth / "items.parquet").sort("item_id")
    topic = np.concatenate([[-1], items.get_column("topic").to_numpy()])
    decay = json.loads((truth / "manifest.json").read_text()).get("click_model", {}).get("recency_decay", 1.0)
    users = pl.read_parquet(truth / "users.parquet") if (truth / "users.parquet").exists() else None
    train, valid = (pl.read_parquet(data_dir / "MicroLens_1M_x1" / f"{t}.parquet") for t in ("train", "valid"))
    count = np.bincount(train.get_column("item_id").to_numpy(), minlength=len(topic))

    def features(frame: pl.DataFrame, user_bias: bool) -> np.ndarray:
        seq = frame.get_column("item_seq")
        hist = topic[seq.list.to_array(seq.list.len().max()).to_numpy()]  # left-padded, newest last
        target = frame.get_column("item_id").to_numpy()
        real = (hist >= 0).sum(axis=1)
        match = hist == topic[target][:, None]
        weights = decay ** np.arange(hist.shape[1])[::-1]
        columns = [topic[target], match.sum(axis=1) / np.maximum(real, 1), real, match @ weights,
                   np.log1p(count[target]), frame.get_column("likes_level").to_numpy(),
                   frame.get_column("views_level").to_numpy()]
        if user_bias:
            bias = frame.select("user_id").join(users, on="user_id", how="left", maintain_order="left")
            columns.append(bias.get_column("click_bias").fill_null(0.0).to_numpy())
        return np.column_stack(columns)

    out = {}
    for name, user_bias in (("topic_oracle", False), ("topic_oracle_with_user_bias", True)):
        if user_bias and users is None:
            continue
        model = HistGradientBoostingClassifier(max_iter=300, categorical_features=[0], random_state=0)
        model.fit(features(train, user_bias), train.get_column("label").to_numpy())
        out[name] = auc(valid.get_column("label").to_numpy(), model.predict_proba(features(valid, user_bias))[:, 1])
    return out


def train_once(res: dict, source: str, variant: str, overrides: dict, best: float,
               manifest: dict | None = None) -> None:
    from mmctr_assets.defs import ctr as task2

    result, seconds = materialise([task2.dcn_din_model], res, run_config=train_config(source, overrides))
    meta = result.asset_materializations_for_node("dcn_din_model")[0].metadata
    auc = meta["best_valid_auc"].value
    line = {"bench": "quality", "source": source, "variant": variant, "overrides": overrides,
            "valid_auc": round(auc, 4), "best_valid_auc": round(best, 4), "gap": round(best - auc, 4),
            "epochs": meta["epochs_run"].value, "best_epoch": meta["best_epoch"].value,
            "stopped_early": meta["stopped_early"].value, "seconds": round(seconds, 1),
            "samples_per_s": meta["samples_per_s"].value, "mlflow_run_id": meta["mlflow_run_id"].value,
            "family": meta["family"].value, "seconds_to_best": meta["seconds_to_best"].value}
    for key, value in (manifest or {}).items():  # other ceilings the generator records (e.g. without the user term)
        if key.startswith("best_valid_auc_") and isinstance(value, (int, float)):
            line[f"gap_{key.removeprefix('best_valid_auc_')}"] = round(value - auc, 4)
    if source == "fused":
        line |= {"goal_gap": GOAL_FUSED_GAP, "meets_goal": best - auc <= GOAL_FUSED_GAP}
    emit(**line)


def bench_quality(args, work: Path) -> None:
    from mmctr_assets.lib.data import demo as demo_data

    data_dir = args.medium_dir or work / "medium"
    if not (data_dir / "ground_truth" / "manifest.json").exists():
        t0 = time.perf_counter()
        demo_data.generate(data_dir, "medium", seed=0, overwrite=True, progress=False)
        emit(bench="generate", size="medium", seconds=round(time.perf_counter() - t0, 1))
    manifest = json.loads((data_dir / "ground_truth" / "manifest.json").read_text())
    best = manifest["best_valid_auc"]
    for name, oracle in ({} if args.no_oracle else topic_oracle_aucs(data_dir)).items():
        emit(bench=name, valid_auc=round(oracle, 4), best_valid_auc=round(best, 4), gap=round(best - oracle, 4),
             model="gradient boosting on true item topics: history share and recency-weighted matches in the "
                   "target's topic, levels, popularity" + (", the user's true click bias" if "user" in name else ""))
    res = resources(data_dir, work)
    sources = {s for s in args.sources.split(",") if s} | (
        set(args.variant_sources.split(",")) if args.variants else set())
    if args.reuse_task1 and (work / "outputs").exists():
        emit(bench="task1_build", reused=str(work / "outputs"))
    elif sources <= {"organisers"}:  # item_info's own table: no Task 1 build needed
        from mmctr_assets.defs.raw import raw_assets

        materialise(raw_assets, res)
    else:
        build_task1(data_dir, work, res, args.fit_clip)
    if args.epochs:
        QUALITY_TRAIN["epochs"] = args.epochs
    if args.threads:
        QUALITY_TRAIN["num_threads"] = args.threads
    for source in [s for s in args.sources.split(",") if s]:
        train_once(res, source, "default", {}, best)
    if args.variants:
        for source in args.variant_sources.split(","):
            for name in args.variants.split(","):
                overrides = VARIANTS[name] | ({"epochs": args.epochs} if args.epochs else {})
                train_once(res, source, name, overrides, best, manifest)


# --------------------------------------------------------------------------------------- full

FULL_STEPS = ("raw", "clip", "item2vec", "fused", "train", "predict")


def child_full_step(step: str, data_dir: str, work: str, clip_model: str, epochs: str) -> dict:
    """One step of the full-size graph, in this fresh process (as the multiprocess executor runs it)."""
    import torch

    from mmctr_assets.defs import ctr as task2
    from mmctr_assets.defs import embeddings as task1
    from mmctr_assets.defs.common import clip_shards
    from mmctr_assets.defs.raw import raw_assets

    res = resources(Path(data_dir), Path(work))
    from mmctr_assets.resources import ComputeResource

    res["compute"] = ComputeResource(device="cpu", num_workers=-1)  # one CLIP prep thread per core
    out = {"torch_threads": torch.get_num_threads()}
    if step == "raw":
        _, seconds = materialise(raw_assets, res)
    elif step == "clip":
        keys = clip_shards.get_partition_keys()
        result, seconds = materialise(
            [task1.clip_embeddings], res, run_config={"ops": {"clip_embeddings": {"config": {"model": clip_model}}}},
            tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]})
        meta = result.asset_materializations_for_node("clip_embeddings")[0].metadata
        out |= {"items": meta["items"].value, "items_per_s": meta["items_per_s"].value,
                "decode_threads": meta["decode_threads"].value}
    elif step == "item2vec":
        result, seconds = materialise([task1.item2vec_embeddings], res)
        meta = result.asset_materializations_for_node("item2vec_embeddings")[0].metadata
        out |= {"seconds_train": meta["seconds_train"].value, "tokens": meta["tokens"].value}
    elif step == "fused":
        _, seconds = materialise([task1.fused_item_embeddings], res)
    elif step == "train":
        result, seconds = materialise([task2.dcn_din_model], res,
                                      run_config=train_config("fused", {"epochs": int(epochs)}))
        import mlflow

        meta = result.asset_materializations_for_node("dcn_din_model")[0].metadata
        params = mlflow.MlflowClient(res["mlflow"].tracking_uri).get_run(meta["mlflow_run_id"].value).data.params
        out |= {"train_rows": int(params["train_rows"]), "epochs": meta["epochs_run"].value,
                "valid_auc": round(meta["best_valid_auc"].value, 4),
                "samples_per_s": meta["samples_per_s"].value, "mlflow_run_id": meta["mlflow_run_id"].value}
    else:
        result, seconds = materialise([task2.predictions], res)
        meta = result.asset_materializations_for_node("predictions")[0].metadata
        out |= {"rows": meta["dagster/row_count"].value, "predict_rows_per_s": meta["rows_per_s"].value,
                "checks_passed": all(c.passed for c in result.get_asset_check_evaluations())}
    return out | {"wall_s": round(seconds, 1), "peak_rss_mb": round(peak_mb(), 1)}


def bench_full(args, work: Path) -> None:
    if not (args.data_dir / "MicroLens_1M_x1" / "train.parquet").exists():
        raise SystemExit(f"--full needs full-size data in --data-dir (got {args.data_dir}); make it with "
                         "`mmctr-demo-data --size full --out DIR` (or `benchmarks/bench_raw.py --keep`)")
    clip_model = args.clip_model
    if clip_model is None:
        from mmctr_assets.lib.embeddings.tiny_clip import build_tiny_clip

        clip_model = str(build_tiny_clip(work / "tiny-clip", seed=0))
    total = 0.0
    for step in FULL_STEPS:
        cmd = [sys.executable, __file__, "--child", step, str(args.data_dir), str(work), clip_model, str(args.epochs)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        process_s = time.perf_counter() - t0
        total += process_s
        if proc.returncode != 0:
            raise RuntimeError(f"full-size step {step} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        emit(bench="full", step=step, **run, process_s=round(process_s, 1), clip_model=clip_model,
             goal_peak_rss_mb=GOAL_FULL_PEAK_MB, meets_goal=run["peak_rss_mb"] < GOAL_FULL_PEAK_MB)
    emit(bench="full", step="total", process_s=round(total, 1), epochs=args.epochs)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child_full_step(*sys.argv[2:7])), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", action="store_true", help="AUC per embedding source on medium demo data")
    ap.add_argument("--sources", default=",".join(SOURCES), help="comma-separated sources trained with defaults")
    ap.add_argument("--variants", nargs="?", const=",".join(v for v in VARIANTS if v != "default"),
                    help=f"with --quality: also these comma-separated variants; bare: all of {list(VARIANTS)[1:]}")
    ap.add_argument("--variant-sources", default="fused", help="comma-separated sources for --variants")
    ap.add_argument("--medium-dir", type=Path, help="reuse (or create) medium demo data here")
    ap.add_argument("--fit-clip", action="store_true",
                    help="fit the tiny CLIP on the demo covers/titles first (content embeddings that carry topics)")
    ap.add_argument("--reuse-task1", action="store_true",
                    help="with --work-dir: reuse the Task 1 outputs a previous --keep run left there")
    ap.add_argument("--no-oracle", action="store_true", help="skip the topic-oracle reference line")
    ap.add_argument("--epochs", type=int,
                    help="quality: cap every run at this many epochs; --full: dcn_din_model epochs (default 1)")
    ap.add_argument("--threads", type=int, help="torch threads for training (1 on a busy shared box)")
    ap.add_argument("--full", action="store_true", help="the whole graph on full-size data, step by step")
    ap.add_argument("--data-dir", type=Path, help="full-size dataset for --full")
    ap.add_argument("--clip-model", help="CLIP for --full (default: a fresh stand-in tiny CLIP)")
    ap.add_argument("--work-dir", type=Path, help="outputs and mlflow.db (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep --work-dir's contents")
    args = ap.parse_args()
    if not (args.quality or args.full):
        ap.error("choose --quality and/or --full")
    if args.full and args.quality and args.epochs:
        ap.error("--epochs means different things for --quality and --full: run them separately")
    if args.full and not args.epochs:
        args.epochs = 1
    unknown = [v for v in (args.variants or "").split(",") if v and v not in VARIANTS]
    unknown += [s for s in (args.sources + "," + args.variant_sources).split(",") if s and s not in SOURCES]
    if unknown:
        ap.error(f"unknown variants/sources {unknown}; variants: {list(VARIANTS)}, sources: {list(SOURCES)}")

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mmctr-bench-pipeline-"))
    modes = [(bench_quality, work / "quality")] * args.quality + [(bench_full, work / "full")] * args.full
    try:
        for bench, folder in modes:
            folder.mkdir(parents=True, exist_ok=True)
            print(f"{bench.__name__}: MLflow runs in sqlite:///{folder / 'mlflow.db'} "
                  f"(mlflow ui --backend-store-uri sqlite:///{folder / 'mlflow.db'})", file=sys.stderr, flush=True)
            bench(args, folder)
    finally:
        if not args.keep:  # everything but the MLflow stores, which the printed run ids point into
            for _, folder in modes:
                for path in folder.glob("*"):
                    if path.name != "mlflow.db":
                        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
