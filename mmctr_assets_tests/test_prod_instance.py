"""The production instance, really run: deploy/dagster.prod.yaml's Postgres storage against a real
PostgreSQL server (pg_server.py), the whole graph materialised through the CLI, and everything the
webserver would show read back from Postgres; the same server backs the MLflow tracking server
(deploy/mlflow-server.sh) that the training run logs to. Then the bad input: Postgres unreachable or
refusing the credentials stops `dagster dev` and a run at start with one message naming the
DAGSTER_PG_* variable to fix.

What runs here and what does not: the K8sRunLauncher needs a cluster, so the test instance swaps it
for Dagster's default launcher (runs as local processes); everything else in the instance file
(storage, pools, run monitoring, telemetry) is the shipped configuration. The port is the test
server's free port instead of the file's 5432. test_deploy_configs.py builds the launcher and the
k8s executor with dagster-k8s and renders their Jobs without a cluster.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import mlflow
import pytest
import yaml
from conftest import SHARDS, mlflow_server_process
from pg_server import PostgresServer, free_port, postgres_server

from mmctr_assets import settings
from mmctr_assets.definitions import defs
from mmctr_assets.instance.postgres_storage import PG_ENV, PostgresStorageUnavailable, check_connection

DEPLOY = settings.PACKAGE_DIR / "deploy"
BIN = Path(sys.executable).parent
DAGSTER = str(BIN / "dagster")
GPU_POOL = "gpu"


@pytest.fixture(scope="module")
def pg() -> PostgresServer:
    with postgres_server() as server:
        server.create_database("dagster")
        server.create_database("mlflow")
        yield server


def prod_instance_home(home: Path, port: int) -> Path:
    """$DAGSTER_HOME with the shipped production instance file, two changes: the default run
    launcher instead of K8sRunLauncher (no cluster here) and the test server's port."""
    config = yaml.safe_load((DEPLOY / "dagster.prod.yaml").read_text())
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    del config["run_launcher"]
    config["storage"]["custom"]["config"]["postgres_db"]["port"] = port
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


def pg_env(pg: PostgresServer, **override: str) -> dict[str, str]:
    env = {PG_ENV["hostname"]: pg.host, PG_ENV["db_name"]: "dagster", PG_ENV["username"]: pg.user,
           PG_ENV["password"]: pg.password}
    return env | override


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path):
    """deploy/mlflow-server.sh on a free loopback port; yields its URL once /health answers."""
    port = free_port()
    env = os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_BACKEND_STORE_URI": backend_uri,
        "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        # MLflow 3's GenAI job runner (its own worker processes): not used by tracking
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    with mlflow_server_process(env, log, timeout_s=180) as url:
        yield url


@pytest.mark.slow
def test_whole_graph_on_postgres_storage_with_mlflow_on_the_same_server(pg, tiny_data, tiny_clip_dir, tmp_path,
                                                                        monkeypatch):
    home = prod_instance_home(tmp_path / "dagster_home", pg.port)
    out = tmp_path / "outputs"
    artifacts = tmp_path / "mlflow-artifacts"
    with mlflow_server(pg.url("mlflow"), artifacts, tmp_path / "mlflow-server.log") as tracking_uri:
        env = os.environ | pg_env(pg) | {
            "DAGSTER_HOME": str(home),
            "MMCTR_DATA_DIR": str(tiny_data),
            "MMCTR_OUTPUT_DIR": str(out),
            "MMCTR_CLIP_MODEL": str(tiny_clip_dir),
            "MMCTR_STATE_DIR": str(tmp_path / "state"),
            "MLFLOW_TRACKING_URI": tracking_uri,
        }
        # in_process: every step's events still go through the Postgres storage, without a
        # Python start-up (torch, the code location, the instance) per step on a 2-core CI machine
        env["MMCTR_EXECUTOR"] = "in_process"
        run = subprocess.run(
            [DAGSTER, "asset", "materialize", "-m", "mmctr_assets", "--select", "not key:ctr_tuning",
             "--partition-range", f"{SHARDS[0]}...{SHARDS[-1]}",
             "--config-json", '{"ops": {"dcn_din_model": {"config": {"train": {"batch_size": 256, "epochs": 2}}}}}'],
            env=env, capture_output=True, text=True, timeout=900,
        )
        assert run.returncode == 0, run.stderr[-4000:]

        # --- MLflow: the training run's metrics live in the server's Postgres database
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        client = mlflow.MlflowClient(tracking_uri)
        (experiment,) = [e for e in client.search_experiments() if e.name == "mmctr"]
        (train,) = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'task2'")
        auc = train.data.metrics["best_valid_auc"]
        assert 0.0 <= auc <= 1.0
        assert train.info.status == "FINISHED"
        assert "model.pt" in [p.name for p in artifacts.rglob("model.pt")]  # artifacts behind the server
        # the model registry on the same Postgres-backed server: the first version is the champion
        champion = client.get_model_version_by_alias("mmctr-ctr", "champion")
        assert champion.run_id == train.info.run_id and champion.version == "1"
    assert pg.query("mlflow", "SELECT value FROM metrics WHERE run_uuid = %s AND key = 'best_valid_auc'",
                    (train.info.run_id,)) == [(auc,)]
    assert not (tmp_path / "state" / "mlflow.db").exists()  # nothing fell back to the local sqlite store

    # --- Dagster: what the webserver shows, read back through the same instance file
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for name, value in pg_env(pg).items():
        monkeypatch.setenv(name, value)
    graph = defs.resolve_asset_graph()
    all_assets = {k.to_user_string() for k in graph.get_all_asset_keys()} - {"ctr_tuning"}  # a study: on demand
    with dg.DagsterInstance.get() as instance:
        (dagster_run,) = instance.get_runs()
        assert dagster_run.status == dg.DagsterRunStatus.SUCCESS
        assert train.data.tags["dagster.run_id"] == dagster_run.run_id

        records = instance.get_records_for_run(dagster_run.run_id,
                                               of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
        materialized = [r.event_log_entry.asset_materialization for r in records]
        assert {m.asset_key.to_user_string() for m in materialized} == all_assets
        assert sorted(m.partition for m in materialized if m.asset_key.path == ["clip_embeddings"]) == sorted(SHARDS)

        check_keys = list(graph.asset_check_keys)
        assert check_keys, "the graph has asset checks"
        checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(check_keys)
        assert set(checks) == set(check_keys)
        assert {k.name: c.status.value for k, c in checks.items()} == {k.name: "SUCCEEDED" for k in check_keys}
        assert {c.run_id for c in checks.values()} == {dagster_run.run_id}

        # the gpu pool: one slot (the shipped default limit), claimed by the GPU steps, free again
        assert GPU_POOL in instance.event_log_storage.get_concurrency_keys()
        pool = instance.event_log_storage.get_concurrency_info(GPU_POOL)
        assert (pool.slot_count, pool.active_slot_count, pool.pending_step_count) == (1, 0, 0)

    # --- and it is all in Postgres, not in files under DAGSTER_HOME
    assert pg.query("dagster", "SELECT run_id, status FROM runs") == [(dagster_run.run_id, "SUCCESS")]
    assert pg.query("dagster", "SELECT count(DISTINCT asset_key) FROM event_logs WHERE dagster_event_type = "
                    "'ASSET_MATERIALIZATION'") == [(len(all_assets),)]
    assert pg.query("dagster", "SELECT count(*) FROM asset_check_executions WHERE execution_status = 'SUCCEEDED'"
                    ) == [(len(check_keys),)]
    assert pg.query("dagster", "SELECT concurrency_key, count(*) FROM concurrency_slots GROUP BY 1") == [(GPU_POOL, 1)]
    assert not list(home.rglob("*.db"))


# ------------------------------------------------------------------------------------------------
# bad input: the message names the variable to fix


@pytest.mark.parametrize(
    ("override", "variables"),
    [
        ({"port_closed": "1"}, ["DAGSTER_PG_HOST"]),
        ({PG_ENV["password"]: "wrong"}, ["DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD"]),
        ({PG_ENV["username"]: "nobody"}, ["DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD"]),
        ({PG_ENV["db_name"]: "no_such_db"}, ["DAGSTER_PG_DB"]),
    ],
    ids=["unreachable", "wrong-password", "unknown-user", "missing-database"],
)
def test_connection_check_names_the_variable_to_fix(pg, override, variables):
    values = pg_env(pg, **{k: v for k, v in override.items() if k.startswith("DAGSTER_")})
    port = free_port() if "port_closed" in override else pg.port
    config = {"postgres_db": {field: values[var] for field, var in PG_ENV.items()} | {"port": port}}
    with pytest.raises(PostgresStorageUnavailable) as raised:
        check_connection(config, retry_waits_s=())
    message = str(raised.value)
    for variable in variables:
        assert variable in message, message
    assert "wrong" not in message  # never echo the password
    check_connection({"postgres_db": {f: pg_env(pg)[v] for f, v in PG_ENV.items()} | {"port": pg.port}})


def run_cli(args: list[str], env: dict, timeout: float) -> tuple[int, str]:
    """A Dagster command's exit code and output; a command that keeps running (`dagster dev` once it
    started) is stopped after `timeout` and reported as still running (None)."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output


@pytest.mark.slow
def test_dagster_dev_and_a_run_stop_at_start_with_the_variable_to_fix(pg, tmp_path):
    home = prod_instance_home(tmp_path / "dagster_home", pg.port)
    base = os.environ | {"DAGSTER_HOME": str(home)}

    code, output = run_cli([DAGSTER, "dev", "-m", "mmctr_assets", "-h", "127.0.0.1", "-p", str(free_port())],
                           base | pg_env(pg, DAGSTER_PG_PASSWORD="not-the-password"), timeout=120)
    assert code == 1, output[-3000:]
    assert "DAGSTER_PG_PASSWORD" in output and "refused user 'mmctr'" in output, output[-3000:]
    assert "Traceback" not in output and "sqlalchemy" not in output.lower(), output[-3000:]

    code, output = run_cli([DAGSTER, "asset", "materialize", "-m", "mmctr_assets", "--select", "raw_item_info"],
                           base | pg_env(pg, DAGSTER_PG_HOST="127.0.0.2"), timeout=120)
    assert code == 1, output[-3000:]
    assert "DAGSTER_PG_HOST" in output and "127.0.0.2" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.parametrize("required", [False, True])
def test_missing_postgres_skips_with_the_install_command_or_fails_in_ci(monkeypatch, required):
    import _pytest.outcomes
    import pg_server

    monkeypatch.setattr(pg_server.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(pg_server.shutil, "which", lambda name: None)
    monkeypatch.setenv("MMCTR_REQUIRE_POSTGRES", "1" if required else "")
    expected = _pytest.outcomes.Failed if required else _pytest.outcomes.Skipped
    with pytest.raises(expected, match=r"apt-get install -y postgresql"):
        pg_server.find_bindir()
