"""Production deployment files load and agree with each other and with the code: the instance
configs against Dagster's own schema, the Kubernetes manifests against the settings the code
reads, the GPU tags against the format dagster-k8s reads, and the MLflow server command for real."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import dagster_instance_config

from mmctr_assets import settings
from mmctr_assets.defs.schedules import build_retrain_schedule
from mmctr_assets.definitions import defs
from mmctr_assets.resources import MlflowResource

DEPLOY = settings.PACKAGE_DIR / "deploy"
PROD = DEPLOY / "dagster.prod.yaml"
GPU_ASSETS = ("clip_embeddings", "dcn_din_model", "predictions")
# the keys dagster-k8s accepts under the dagster-k8s/config tag (USER_DEFINED_K8S_JOB_CONFIG_SCHEMA
# in dagster_k8s/job.py, 0.29.x)
K8S_TAG_KEYS = {"container_config", "pod_template_spec_metadata", "pod_spec_config", "job_config",
                "job_metadata", "job_spec_config", "merge_behavior"}


def k8s_manifests() -> dict[str, dict]:
    docs = yaml.safe_load_all((DEPLOY / "k8s" / "mmctr.yaml").read_text())
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


@pytest.mark.parametrize("name", ["dagster.yaml", "dagster.prod.yaml"])
def test_instance_configs_validate_against_dagster_schema(name):
    config, _ = dagster_instance_config(str(DEPLOY), name)
    assert config["concurrency"]["pools"]["default_limit"] == 1  # the GPU pool
    assert config["telemetry"]["enabled"] is False


def test_prod_instance_uses_postgres_and_the_k8s_run_launcher():
    config, _ = dagster_instance_config(str(DEPLOY), PROD.name)
    db = config["storage"]["postgres"]["postgres_db"]
    assert {k: db[k] for k in ("hostname", "db_name", "username", "password")} == {
        "hostname": {"env": "DAGSTER_PG_HOST"}, "db_name": {"env": "DAGSTER_PG_DB"},
        "username": {"env": "DAGSTER_PG_USERNAME"}, "password": {"env": "DAGSTER_PG_PASSWORD"},
    }
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s.launcher", "K8sRunLauncher")


def test_schema_validation_catches_a_typo(tmp_path):
    config = yaml.safe_load(PROD.read_text())
    config["storage"]["postgres"]["postgres_db"]["hostnme"] = config["storage"]["postgres"]["postgres_db"].pop("hostname")
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DagsterInvalidConfigError, match="hostnme"):
        dagster_instance_config(str(tmp_path))


def test_k8s_run_launcher_config_matches_dagster_k8s():
    k8s = pytest.importorskip(
        "dagster_k8s", reason="dagster-k8s not installed: 0.29.27 pins dagster==1.13.27 (we run 1.13.28)"
    )
    from dagster._config import validate_config

    result = validate_config(k8s.K8sRunLauncher.config_type(), yaml.safe_load(PROD.read_text())["run_launcher"]["config"])
    assert result.success, result.errors


def test_every_pod_mounts_the_volume_that_holds_data_outputs_and_weights():
    launcher = yaml.safe_load(PROD.read_text())["run_launcher"]["config"]
    manifests = k8s_manifests()
    env = manifests["ConfigMap/mmctr-env"]["data"]
    assert launcher["env_config_maps"] == ["mmctr-env"]
    (volume,) = launcher["volumes"]
    (mount,) = launcher["volume_mounts"]
    assert volume["name"] == mount["name"]
    claim = manifests[f"PersistentVolumeClaim/{volume['persistentVolumeClaim']['claimName']}"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on different nodes share it
    for key in ("MMCTR_DATA_DIR", "MMCTR_OUTPUT_DIR", "MMCTR_STATE_DIR", "MMCTR_CLIP_MODEL"):
        assert Path(env[key]).is_relative_to(mount["mount_path"]), (key, env[key])


def test_k8s_environment_sets_only_variables_the_code_reads():
    read = set()
    for path in settings.PACKAGE_DIR.rglob("*.py"):
        read |= set(re.findall(r"\"(MMCTR_[A-Z_]+)\"", path.read_text()))
    env = k8s_manifests()["ConfigMap/mmctr-env"]["data"]
    assert {k for k in env if k.startswith("MMCTR_")} <= read
    assert env["MMCTR_EXECUTOR"] == "k8s" and env["MMCTR_EXECUTOR"] in settings.EXECUTORS
    assert int(env["MMCTR_CLIP_SHARDS"]) >= 1
    build_retrain_schedule(env["MMCTR_RETRAIN_CRON"], env["MMCTR_RETRAIN_TZ"])  # raises if invalid
    # the instance file's env references are all provided (the password comes from its Secret)
    referenced = set(re.findall(r"\{env: (\w+)\}", PROD.read_text()))
    assert referenced - set(env) == {"DAGSTER_PG_PASSWORD"}


def test_gpu_assets_request_one_gpu_in_the_format_dagster_k8s_reads():
    assets = {a.key.to_user_string(): a for a in defs.resolve_asset_graph().assets_defs}
    for name in GPU_ASSETS:
        tags = assets[name].op.tags
        config = json.loads(tags["dagster-k8s/config"])
        assert set(config) <= K8S_TAG_KEYS, name
        assert config["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1", name
    for name in set(assets) - set(GPU_ASSETS):
        assert "dagster-k8s/config" not in assets[name].op.tags, f"{name} would hold a GPU it does not use"
    try:
        from dagster_k8s.job import get_user_defined_k8s_config
    except ImportError:
        return
    for name in GPU_ASSETS:
        parsed = get_user_defined_k8s_config(assets[name].op.tags)
        assert parsed.container_config["resources"]["limits"] == {"nvidia.com/gpu": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_server_command_tracks_runs_in_a_database(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri also sets it
    port = free_port()
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
    }
    log = tmp_path / "mlflow-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(DEPLOY / "mlflow-server.sh")], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        tracking = MlflowResource(tracking_uri=f"http://127.0.0.1:{port}", experiment_name="deploy-check")
        with tracking.start_run("probe", tags={"dagster.run_id": "r1"}) as run:
            mlflow.log_metric("valid_auc", 0.75)
            (tmp_path / "roc.png").write_bytes(b"png")
            mlflow.log_artifact(str(tmp_path / "roc.png"), artifact_path="plots")
        assert tracking.run_url(run).startswith(f"http://127.0.0.1:{port}/#/experiments/")
        stored = mlflow.MlflowClient(f"http://127.0.0.1:{port}").get_run(run.info.run_id)
        assert stored.data.metrics == {"valid_auc": 0.75} and stored.data.tags["dagster.run_id"] == "r1"
        # runs live in the database, artifacts behind the server in the destination folder
        assert (tmp_path / "mlflow.db").stat().st_size > 0
        assert [p.name for p in (tmp_path / "artifacts").rglob("roc.png")] == ["roc.png"]
    finally:
        mlflow.set_tracking_uri(None)  # later tests must not talk to this server
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_mlflow_server_command_says_what_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    result = subprocess.run([str(DEPLOY / "mlflow-server.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "MLFLOW_BACKEND_STORE_URI" in result.stderr and "postgresql://" in result.stderr


@pytest.mark.parametrize("name", ["demo_run_config.yaml", "full_run_config.yaml"])
def test_make_demo_run_configs_are_valid_dcn_din_configs(name):
    """`make demo` / `make demo-full` pass these with --config: they must parse as dcn_din_model config."""
    from mmctr_assets.defs.ctr import DcnDinConfig

    config = yaml.safe_load((settings.PACKAGE_DIR / "deploy" / name).read_text())
    assert set(config["ops"]) == {"dcn_din_model"}
    _, train = DcnDinConfig(**config["ops"]["dcn_din_model"]["config"]).library_configs()
    if name.startswith("full"):
        assert train["batch_size"] == 4096 and train["epochs"] == 10
