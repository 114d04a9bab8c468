"""The champion gate on demo data (issue 30): what DeLong's paired test says about retrains.

Demo ``small`` (``--world v2`` by default): raw -> clip_embeddings from the organisers' vectors
(``source: precomputed``, no encoder) -> item2vec -> fused, then ``dcn_din_model`` materialised
through Dagster with the same config several times against one registry: the first version is
promoted (no champion), then a retrain with the same seed (the same model: difference 0), then
retrains with other seeds (the same config otherwise: how far two equally good models differ on
the validation rows). One JSON line per retrain: the gate's verdict, both AUCs, the difference,
its interval and p-value, and whether the bare point rule (alpha 0.5) would have promoted it.

    .venv/bin/python benchmarks/bench_gate.py [--data-dir DIR] [--world v2|v3] [--seeds 0,0,1,2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402
from bench_pipeline import materialise, resources, train_config  # noqa: E402


def build_inputs(res: dict) -> None:
    from mmctr_assets.defs import embeddings as task1
    from mmctr_assets.defs.common import clip_shards
    from mmctr_assets.defs.raw import raw_assets

    keys = clip_shards.get_partition_keys()
    materialise(raw_assets, res)
    precomputed = {"ops": {"clip_embeddings": {"config": {"source": "precomputed"}}}}
    materialise([task1.clip_embeddings], res, run_config=precomputed,
                tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]})
    materialise([task1.item2vec_embeddings], res)
    materialise([task1.fused_item_embeddings], res)


def retrain(res: dict, seed: int, epochs: int) -> dict:
    import dagster as dg

    from mmctr_assets.defs import ctr

    t0 = time.perf_counter()
    result = dg.materialize([ctr.dcn_din_model], resources=res, instance=dg.DagsterInstance.ephemeral(),
                            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
                            | train_config("fused", {"seed": seed, "epochs": epochs}), raise_on_error=False)
    check = next(e.asset_check_evaluation_data for e in result.all_events
                 if e.event_type_value == "ASSET_CHECK_EVALUATION")
    meta = {k: v.value for k, v in check.metadata.items()}
    tolerance = meta.get("tolerance", 0.0)
    line = {"seed": seed, "version": meta["version"], "alias": meta["alias"], "valid_auc": round(meta["valid_auc"], 5),
            "wall_s": round(time.perf_counter() - t0, 1)}
    if "auc_diff" in meta:
        line |= {"champion_version": meta["champion_version"],
                 "champion_valid_auc": round(meta["champion_valid_auc"], 5),
                 "auc_diff": round(meta["auc_diff"], 5), "ci_level": round(meta["ci_level"], 3),
                 "ci": [round(meta["auc_diff_ci_low"], 5), round(meta["auc_diff_ci_high"], 5)],
                 "p_value_worse": round(meta["p_value_worse"], 4), "gate_alpha": meta["gate_alpha"],
                 "tolerance": tolerance, "point_rule_promotes": meta["auc_diff"] >= -tolerance}
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, help="reuse (or create) small demo data here")
    ap.add_argument("--world", default="v2", choices=("v1", "v2", "v3"))
    ap.add_argument("--seeds", default="0,0,1,2", help="train seed of each retrain, in order (the first: champion)")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs of each retrain")
    ap.add_argument("--work-dir", type=Path, help="outputs and mlflow.db (default: a temp dir)")
    args = ap.parse_args()

    from mmctr_assets.lib.data import demo as demo_data

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mmctr-bench-gate-"))
    data_dir = args.data_dir or work / "small"
    if not (data_dir / "ground_truth" / "manifest.json").exists():
        demo_data.generate(data_dir, "small", seed=0, overwrite=True, progress=False, world=args.world)
    res = resources(data_dir, work)
    build_inputs(res)
    for seed in (int(s) for s in args.seeds.split(",")):
        emit(bench="gate", world=args.world, size="small", epochs=args.epochs, **retrain(res, seed, args.epochs))


if __name__ == "__main__":
    main()
