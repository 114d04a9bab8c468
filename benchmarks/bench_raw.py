"""Peak memory and wall time of each raw_* asset on the full-size dataset, through the real assets.

Each asset is materialised with ``dg.materialize`` in its OWN fresh subprocess, so ``ru_maxrss``
is that asset's peak alone; a second subprocess reads the snapshot the asset wrote to measure its
Arrow in-memory size without polluting the peak. One JSON line per asset; goal: loading and
validating train peaks below 3x its Arrow size. ``--breakdown`` adds one line per step of the
train asset (read, checks, metadata, snapshot write), each step again in a fresh subprocess.

    .venv/bin/python benchmarks/bench_raw.py [--data-dir DIR] [--keep] [--breakdown]

Without ``--data-dir`` (or when it is empty) the full-size demo data is generated (~100 s,
~0.5 GB on disk) and deleted at the end unless ``--keep``; an existing dataset is never deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import emit, peak_mb  # noqa: E402

ORDER = ("item_info", "train", "valid", "test", "item_feature", "item_images")
GOAL_TRAIN_PEAK_OVER_ARROW = 3.0
MB = 1 << 20


def rss_mb() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def snapshot_path(out_dir: Path, table: str) -> Path:
    return out_dir / "raw" / f"{table}.parquet"


# ------------------------------------------------------------------------------ child processes

def child_materialise(table: str, data_dir: str, out_dir: str) -> dict:
    import dagster as dg

    from mmctr_assets.defs.raw import raw_assets
    from mmctr_assets.resources import ProjectStorage

    asset = next(a for a in raw_assets if a.key.to_user_string() == f"raw_{table}")
    resources = {"storage": ProjectStorage(data_dir=data_dir, output_dir=out_dir)}
    instance = dg.DagsterInstance.ephemeral()

    @dg.asset
    def warm_up() -> None:
        """Loads Dagster's lazily imported run machinery before the baseline is taken."""

    dg.materialize([warm_up], instance=instance)
    baseline = rss_mb()
    t0 = time.perf_counter()
    result = dg.materialize([asset], resources=resources, instance=instance)
    wall = time.perf_counter() - t0
    checks = result.get_asset_check_evaluations()
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(peak_mb(), 1), "baseline_rss_mb": round(baseline, 1),
            "success": result.success, "checks_passed": all(c.passed for c in checks), "checks": len(checks)}


def child_arrow_size(path: str) -> dict:
    import polars as pl
    import pyarrow.parquet as pq

    polars_mb = pl.read_parquet(path).estimated_size() / MB
    arrow_mb = pq.read_table(path).nbytes / MB
    return {"arrow_mb": round(arrow_mb, 1), "polars_estimated_mb": round(polars_mb, 1),
            "parquet_mb": round(os.path.getsize(path) / MB, 1)}


def child_step(step: str, data_dir: str, out_dir: str) -> dict:
    """One cumulative slice of what raw_train does, to see where its memory goes."""
    import polars as pl

    from mmctr_assets.defs.raw import _table_metadata
    from mmctr_assets.lib.data import checks, microlens
    from mmctr_assets.lib.io import write_parquet_atomic

    baseline = rss_mb()
    t0 = time.perf_counter()
    frame = microlens.read_table(data_dir, "train")
    after_read = peak_mb()
    if step == "checks":
        n_items = pl.scan_parquet(microlens.table_path(data_dir, "item_info")).select(pl.len()).collect().item() - 1
        checks.content_checks("train", frame, n_items)
    elif step == "metadata":
        _table_metadata("train", frame, "fingerprint")
    elif step == "write":
        write_parquet_atomic(frame, Path(out_dir) / "step_write.parquet")
    return {"wall_s": round(time.perf_counter() - t0, 2), "baseline_rss_mb": round(baseline, 1),
            "peak_after_read_mb": round(after_read, 1), "peak_rss_mb": round(peak_mb(), 1)}


def child_generate(data_dir: str) -> dict:
    from mmctr_assets.lib.data import demo as demo_data

    t0 = time.perf_counter()
    manifest = demo_data.generate(data_dir, "full", seed=0, overwrite=True, progress=False)
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_mb(), 1),
            "counts": manifest["counts"]}


# ------------------------------------------------------------------------------------- parent

def run_child(*args: str) -> dict:
    """Run this script in a fresh interpreter and return the JSON it prints last."""
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def has_data(data_dir: Path) -> bool:
    return (data_dir / "MicroLens_1M_x1" / "train.parquet").exists()


def bench_assets(data_dir: Path, out_dir: Path) -> None:
    for table in ORDER:
        run = run_child("materialise", table, str(data_dir), str(out_dir))
        size = run_child("arrow_size", str(snapshot_path(out_dir, table)))
        grown = run["peak_rss_mb"] - run["baseline_rss_mb"]
        result = {"bench": "raw_asset", "asset": f"raw_{table}", **run, **size,
                  "growth_over_arrow": round(grown / size["arrow_mb"], 2),
                  "peak_over_arrow": round(run["peak_rss_mb"] / size["arrow_mb"], 2)}
        if table == "train":
            result |= {"goal_peak_over_arrow": GOAL_TRAIN_PEAK_OVER_ARROW,
                       "meets_goal": result["peak_over_arrow"] < GOAL_TRAIN_PEAK_OVER_ARROW}
        emit(**result)


def bench_breakdown(data_dir: Path, out_dir: Path) -> None:
    arrow_mb = run_child("arrow_size", str(snapshot_path(out_dir, "train")))["arrow_mb"]
    for step in ("read", "checks", "metadata", "write"):
        run = run_child("step", step, str(data_dir), str(out_dir))
        emit(bench="raw_train_step", step=f"read+{step}" if step != "read" else "read", arrow_mb=arrow_mb, **run,
             growth_over_arrow=round((run["peak_rss_mb"] - run["baseline_rss_mb"]) / arrow_mb, 2),
             peak_over_arrow=round(run["peak_rss_mb"] / arrow_mb, 2))
    (out_dir / "step_write.parquet").unlink(missing_ok=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, args = sys.argv[2], sys.argv[3:]
        fn = {"materialise": child_materialise, "arrow_size": child_arrow_size, "step": child_step,
              "generate": child_generate}[kind]
        print(json.dumps(fn(*args)), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, help="full-size dataset to reuse (generated here when absent)")
    ap.add_argument("--keep", action="store_true", help="keep generated data and the raw snapshots")
    ap.add_argument("--breakdown", action="store_true", help="also measure each step of raw_train")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mmctr-bench-raw-"))
    data_dir = args.data_dir or work / "data"
    generated = not has_data(data_dir)
    try:
        if generated:
            emit(bench="generate", size="full", data_dir=str(data_dir), **run_child("generate", str(data_dir)))
        bench_assets(data_dir, work / "outputs")
        if args.breakdown:
            bench_breakdown(data_dir, work / "outputs")
    finally:
        if args.keep:
            print(f"kept: data {data_dir}, snapshots {work / 'outputs'}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
            if generated:
                shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
