"""The documented commands, run for real: the cold start of the whole graph and a zip rebuild."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from conftest import SHARDS

DAGSTER = str(Path(sys.executable).parent / "dagster")
DG = str(Path(sys.executable).parent / "dg")
# `dg` finds the project by its pyproject.toml ([tool.dg]) in the working directory
REPO = Path(__file__).parents[1]


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([DAGSTER, *args], env=env, capture_output=True, text=True, timeout=900)


def run_dg(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([DG, *args], env=env, capture_output=True, text=True, timeout=900, cwd=REPO)


def framework_warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if "Warning:" in line]


@pytest.mark.slow
def test_cold_start_then_rebuild_zip_from_cli(tiny_data, tiny_clip_dir, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((Path(__file__).parents[1] / "mmctr_assets/deploy/dagster.yaml").read_text())
    out = tmp_path / "outputs"
    env = os.environ | {
        "DAGSTER_HOME": str(home),
        "MMCTR_DATA_DIR": str(tiny_data),
        "MMCTR_OUTPUT_DIR": str(out),
        "MMCTR_CLIP_MODEL": str(tiny_clip_dir),
        "MMCTR_STATE_DIR": str(tmp_path / "state"),
    }
    listed = run(["asset", "list", "-m", "mmctr_assets"], env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assets = set(listed.stdout.split())
    assert {"clip_embeddings", "item2vec_embeddings", "fused_item_embeddings", "dcn_din_model",
            "predictions", "submission_zip"} <= assets

    cold = run(
        ["asset", "materialize", "-m", "mmctr_assets", "--select", "not key:ctr_tuning",
         "--partition-range", f"{SHARDS[0]}...{SHARDS[-1]}",
         "--config-json", '{"ops": {"dcn_din_model": {"config": {"train": {"batch_size": 256, "epochs": 2}}}}}'],
        env,
    )
    assert cold.returncode == 0, cold.stderr[-4000:]
    assert "RANDOM WEIGHTS" in cold.stderr  # the demo says plainly that its encoder is random
    for path in ["item_info_updated.parquet", "prediction.csv", "submission.zip", "dcn_din_model/model.pt"]:
        assert (out / path).exists(), path
    assert sorted(p.name for p in (out / "clip_embeddings").iterdir()) == [f"shard-{k}.parquet" for k in SHARDS]
    assert (tmp_path / "state" / "mlflow.db").exists()

    first_zip = (out / "submission.zip").stat().st_mtime_ns
    rebuilt = run(["asset", "materialize", "-m", "mmctr_assets", "--select", "submission_zip"], env)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert (out / "submission.zip").stat().st_mtime_ns > first_zip
    with zipfile.ZipFile(out / "submission.zip") as zf, zf.open("prediction.csv") as f:
        assert pl.read_csv(f).columns == ["ID", "Task2"]

    # the same rebuild with Dagster's current CLI, from the project's [tool.dg] settings; quiet
    second_zip = (out / "submission.zip").stat().st_mtime_ns
    launched = run_dg(["launch", "--assets", "submission_zip"], env)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert (out / "submission.zip").stat().st_mtime_ns > second_zip
    assert framework_warnings(launched.stdout + launched.stderr) == []

    # the runs persist in DAGSTER_HOME: what `dagster dev` / `dg dev` show afterwards
    instance = dg.DagsterInstance.from_config(str(home))
    assert len(instance.get_runs()) == 3
    status = instance.get_status_by_partition(dg.AssetKey("clip_embeddings"), SHARDS,
                                              dg.StaticPartitionsDefinition(SHARDS))
    assert set(status.values()) == {dg.AssetPartitionStatus.MATERIALIZED}

    # issue 29: raw_test refused (a duplicated ID): serving refuses from the CLI, the zip alone too
    # (through predictions and raw_test: the code location's whole graph), and nothing changes
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    test = pl.read_parquet(data / "MicroLens_1M_x1" / "test.parquet")
    test.with_columns(ID=pl.when(pl.int_range(pl.len()) == 1).then(test["ID"][0]).otherwise(pl.col("ID"))) \
        .write_parquet(data / "MicroLens_1M_x1" / "test.parquet")
    env = env | {"MMCTR_DATA_DIR": str(data)}
    served = {p: (out / p).read_bytes() for p in ("raw/test.parquet", "prediction.csv", "submission.zip")}
    assert run(["asset", "materialize", "-m", "mmctr_assets", "--select", "raw_test"], env).returncode != 0
    refused_run = instance.get_runs(limit=1)[0].run_id
    serving = run(["asset", "materialize", "-m", "mmctr_assets", "--select", "predictions,submission_zip"], env)
    assert serving.returncode != 0 and f"predictions did not run: the latest materialisation of raw_test (run " \
        f"{refused_run[:8]} failure" in serving.stderr, serving.stderr[-3000:]
    zip_alone = run(["asset", "materialize", "-m", "mmctr_assets", "--select", "submission_zip"], env)
    assert zip_alone.returncode != 0 and f"raw_test (run {refused_run[:8]}" in zip_alone.stderr
    assert "dg launch --assets raw_test,predictions" in zip_alone.stderr, zip_alone.stderr[-3000:]
    assert {p: (out / p).read_bytes() for p in served} == served


@pytest.mark.slow
def test_dg_checks_and_lists_the_project(tmp_path):
    """`dg check defs` and `dg list defs` load the same code location as `dagster dev`, print no
    framework warnings (the project's venv need not be activated), and list the card's assets."""
    import json

    home = tmp_path / "dagster_home"
    home.mkdir()
    env = os.environ | {"DAGSTER_HOME": str(home), "MMCTR_STATE_DIR": str(tmp_path / "state"),
                        "MMCTR_OUTPUT_DIR": str(tmp_path / "outputs")}
    env.pop("VIRTUAL_ENV", None)
    checked = run_dg(["check", "defs"], env)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr
    assert framework_warnings(checked.stdout + checked.stderr) == []
    listed = run_dg(["list", "defs", "--json"], env)
    assert listed.returncode == 0, listed.stderr[-3000:]
    defs = json.loads(listed.stdout)
    assets = {a["asset_key"] for a in defs["assets"]}
    assert {"raw_train", "clip_embeddings", "item2vec_embeddings", "fused_item_embeddings", "dcn_din_model",
            "predictions", "submission_zip"} <= assets
    assert {"retrain_job", "full_refresh_job"} <= {j["name"] for j in defs["jobs"]}
