"""Shared fixtures: one tiny generated dataset and one tiny random-weight CLIP per test session."""

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from mmctr_assets import settings
from mmctr_assets.defs import embeddings as task1
from mmctr_assets.defs.common import clip_shards
from mmctr_assets.defs.raw import raw_assets
from mmctr_assets.lib.data import demo as demo_data
from mmctr_assets.lib.embeddings import tiny_clip
from mmctr_assets.resources import ComputeResource, MlflowResource, ProjectStorage

SHARDS = clip_shards.get_partition_keys()
# run tags that make one run cover every CLIP shard (single-run backfill)
RANGE = {"dagster/asset_partition_range_start": SHARDS[0], "dagster/asset_partition_range_end": SHARDS[-1]}


def clip_config(model_dir) -> dict:
    return {"ops": {"clip_embeddings": {"config": {"model": str(model_dir)}}}}


@pytest.fixture(autouse=True)
def _private_cpu_locks(tmp_path, monkeypatch):
    """Each test leases cores from its own lock folder (lib/cores.py): the machine-wide one is shared
    with every other mmctr process, so a test counting the cores it got would depend on them."""
    monkeypatch.setenv("MMCTR_CPU_LOCK_DIR", str(tmp_path / "cpu-locks"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny MicroLens-format dataset with planted signal (read-only: copy before corrupting)."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    demo_data.generate(root, "tiny", seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return tiny_clip.build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


@pytest.fixture
def data_copy(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny dataset that a test may damage."""
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


@pytest.fixture
def instance(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as inst:
        yield inst


def build_resources(data_dir: Path, output_dir: Path, mlflow_uri: str | None = None) -> dict:
    return {
        "storage": ProjectStorage(data_dir=str(data_dir), output_dir=str(output_dir)),
        # workers=0: tiny inputs, and no worker start-up cost in tests
        "compute": ComputeResource(device="cpu", num_workers=0, batch_size=32),
        "mlflow": MlflowResource(tracking_uri=mlflow_uri or f"sqlite:///{output_dir.parent / 'mlflow.db'}"),
    }


@pytest.fixture(scope="session")
def make_resources():
    return build_resources


@pytest.fixture
def resources(tiny_data, tmp_path) -> dict:
    return build_resources(tiny_data, tmp_path / "outputs")


@pytest.fixture(scope="session")
def task1_outputs(tiny_data, tiny_clip_dir, tmp_path_factory, make_resources):
    """Raw snapshots, every CLIP shard, item2vec and fusion on the tiny data, built once per session
    (read-only: copy before changing)."""
    out = tmp_path_factory.mktemp("task1") / "outputs"
    resources = make_resources(tiny_data, out)
    with dg.instance_for_test() as instance:
        assert dg.materialize(raw_assets, resources=resources, instance=instance).success
        result = dg.materialize(
            [task1.clip_embeddings, task1.item2vec_embeddings, task1.fused_item_embeddings],
            resources=resources,
            instance=instance,
            tags=RANGE,
            run_config=clip_config(tiny_clip_dir),
        )
        assert result.success
        loads = sum("RANDOM WEIGHTS" in (e.user_message or "") for e in instance.all_logs(result.run_id))
    return out, result, loads


@contextlib.contextmanager
def mlflow_server_process(env: dict, log: Path, timeout_s: float):
    """deploy/mlflow-server.sh with ``env`` (MLFLOW_PORT set); yields its URL once /health answers,
    and stops the server's whole process group afterwards."""
    url = f"http://127.0.0.1:{env['MLFLOW_PORT']}"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(settings.PACKAGE_DIR / "deploy" / "mlflow-server.sh")], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
