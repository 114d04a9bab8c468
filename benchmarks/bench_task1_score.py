"""The Task 1 scorer's AUC per item table, and its run time (issue 12, benchmark item 3).

Demo data ``medium`` (``--world v2`` by default), raw -> clip_embeddings (tiny CLIP fitted on
the demo covers/titles unless ``--no-fit-clip``) -> item2vec -> fused, then ``task1_score``
materialised through Dagster once per item table (content, item2vec, fused, organisers). One JSON
line per table: the scorer's valid AUC, the generator's ceilings (with and without the per-user
term), epochs, best epoch and wall time; a second fused run checks the score is reproducible.

    .venv/bin/python benchmarks/bench_task1_score.py [--medium-dir DIR] [--world v1|v2|v3] [--sources fused,...]

``--content-sources encoder,precomputed`` (issue 30) scores the tables once per clip_embeddings
source: the CLIP encoder, then the organisers' txt_emb_BERT + img_emb_CLIPRN50 projected without
an encoder (clip_embeddings and fusion rebuilt in between; item2vec is shared). One JSON line per
clip_embeddings build (its wall time) and per table scored, each naming its content source.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402
from bench_pipeline import SOURCES, build_task1, materialise, resources  # noqa: E402


def score(res: dict, source: str) -> dict:
    from mmctr_assets.defs import scorer

    result, seconds = materialise([scorer.task1_score], res,
                                  run_config={"ops": {"task1_score": {"config": {"embedding_source": source}}}})
    meta = result.asset_materializations_for_node("task1_score")[0].metadata
    return {"valid_auc": round(meta["valid_auc"].value, 4), "epochs": meta["epochs_run"].value,
            "best_epoch": meta["best_epoch"].value, "train_s": meta["seconds"].value, "wall_s": round(seconds, 1),
            "table_fingerprint": meta["table_fingerprint"].value, "exact_auc": meta["valid_auc"].value}


def rebuild_content(res: dict, content: str) -> None:
    """clip_embeddings (every shard, one run) from ``content`` and the fused table over it."""
    from mmctr_assets.defs import embeddings as task1
    from mmctr_assets.defs.common import clip_shards

    keys = clip_shards.get_partition_keys()
    result, clip_s = materialise(
        [task1.clip_embeddings], res, run_config={"ops": {"clip_embeddings": {"config": {"source": content}}}},
        tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]})
    _, fused_s = materialise([task1.fused_item_embeddings], res)
    meta = result.asset_materializations_for_node("clip_embeddings")[0].metadata
    emit(bench="clip_embeddings", content_source=content, clip_s=round(clip_s, 1), fused_s=round(fused_s, 1),
         items=meta["items"].value, step_s=meta["seconds"].value if "seconds" in meta else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--medium-dir", type=Path, help="reuse (or create) medium demo data here")
    ap.add_argument("--world", default="v2", choices=("v1", "v2", "v3"), help="demo world when creating the data")
    ap.add_argument("--sources", default=",".join(SOURCES))
    ap.add_argument("--size", default="medium", help="demo size when creating the data")
    ap.add_argument("--no-repeat", action="store_true", help="skip the second fused score (reproducibility)")
    ap.add_argument("--content-sources", default="encoder",
                    help="clip_embeddings sources to build the content/fused tables from: encoder,precomputed")
    ap.add_argument("--no-fit-clip", action="store_true", help="keep the tiny CLIP's random weights")
    ap.add_argument("--item2vec-corpus", default="user", choices=("user", "row"),
                    help="item2vec corpus: one line per user timeline (default) or per training row")
    ap.add_argument("--work-dir", type=Path, help="outputs and mlflow.db (default: a temp dir)")
    args = ap.parse_args()
    unknown = [s for s in args.sources.split(",") if s not in SOURCES and not s.startswith("item_emb:")]
    if unknown:
        ap.error(f"unknown sources {unknown}; choose from {list(SOURCES)}")

    from mmctr_assets.defs import scorer
    from mmctr_assets.lib.data import demo as demo_data

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mmctr-bench-task1-score-"))
    data_dir = args.medium_dir or work / "medium"
    if not (data_dir / "ground_truth" / "manifest.json").exists():
        t0 = time.perf_counter()
        demo_data.generate(data_dir, args.size, seed=0, overwrite=True, progress=False, world=args.world)
        emit(bench="generate", size=args.size, world=args.world, seconds=round(time.perf_counter() - t0, 1))
    manifest = json.loads((data_dir / "ground_truth" / "manifest.json").read_text())
    ceilings = {"world": manifest.get("world", "v1"), "size": manifest["size"]["name"],
                "best_valid_auc": round(manifest["best_valid_auc"], 4)}
    if "best_valid_auc_without_user_bias" in manifest:
        ceilings["best_valid_auc_without_user_bias"] = round(manifest["best_valid_auc_without_user_bias"], 4)
    res = resources(data_dir, work)
    build_task1(data_dir, work, res, fit_clip=not args.no_fit_clip,
                item2vec_config={"one_line_per_user": args.item2vec_corpus == "user"})
    fused_auc = None
    for i, content in enumerate(args.content_sources.split(",")):
        if i or content != "encoder":  # build_task1 built the encoder's tables; rebuild for another source
            rebuild_content(res, content)
        for source in args.sources.split(","):
            if i and source not in ("content", "fused"):
                continue  # the other tables do not read clip_embeddings: scored once
            line = score(res, source)
            fused_auc = line["exact_auc"] if source == "fused" and not i else fused_auc
            emit(bench="task1_score", source=source, content_source=content, scorer_version=scorer.SCORER_VERSION,
                 **ceilings, gap=round(manifest["best_valid_auc"] - line.pop("exact_auc"), 4), **line)
        if i == 0 and fused_auc is not None and not args.no_repeat:
            again = score(res, "fused")
            emit(bench="task1_score_repeat", source="fused", same_score=again["exact_auc"] == fused_auc,
                 valid_auc=again["valid_auc"], wall_s=again["wall_s"])
            fused_auc = None
    print(f"MLflow runs: mlflow ui --backend-store-uri sqlite:///{work / 'mlflow.db'}", file=sys.stderr)


if __name__ == "__main__":
    main()
