"""The UI for real: `dagster dev` (webserver + daemon) on a loopback port with a temporary
DAGSTER_HOME, driven through its GraphQL API and in headless Chromium.

The tests share one server and run in file order: load the code location, materialise the whole
graph once, re-encode one CLIP shard and watch automation refresh what is downstream, then look
at the asset graph in a browser.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster_graphql import DagsterGraphQLClient
from ui_browser import chromium_or_skip

from mmctr_assets import settings
from mmctr_assets.definitions import defs
from mmctr_assets.defs.common import clip_shards
from mmctr_assets.defs.jobs import all_shards_tags

pytestmark = pytest.mark.slow

REPO = settings.PACKAGE_DIR.parent
ARTIFACTS = REPO / "test-artifacts"
DAGSTER = Path(sys.executable).with_name("dagster")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]
ASSETS = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
GROUPS = {"raw", "task1_embeddings", "task2_ctr"}
DOWNSTREAM = {"fused_item_embeddings", "dcn_din_model", "predictions", "submission_zip"}
# runs only when asked for (a study of many trainings): no refresh job or automation materialises it
ON_DEMAND = {"ctr_tuning"}
SHARDS = clip_shards.get_partition_keys()
# tiny data: no image-decoding worker processes, CPU only
RUN_CONFIG = {"resources": {"compute": {"config": {"device": "cpu", "num_workers": 0, "batch_size": 32}}}}
RUN_TIMEOUT_S = 900


@dataclass
class Server:
    port: int
    root: Path
    log: Path
    outputs: Path

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/graphql",
            data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.load(response)
        assert "errors" not in body, body["errors"]
        return body["data"]

    def client(self) -> DagsterGraphQLClient:
        return DagsterGraphQLClient("127.0.0.1", port_number=self.port)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_for_run(self, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        client = self.client()
        while time.monotonic() < deadline:
            status = client.get_run_status(run_id).value
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                return status
            time.sleep(2)
        raise AssertionError(f"run {run_id} not finished after {timeout_s}s; dagster dev log:\n{self.log_tail()}")

    def run_failure(self, run_id: str) -> str:
        """The failed steps' errors, for assertion messages."""
        data = self.graphql(
            """query ($id: ID!) { logsForRun(runId: $id, limit: 2000) { ... on EventConnection {
                 events { __typename ... on ExecutionStepFailureEvent { stepKey error { message } }
                                     ... on RunFailureEvent { message } } } } }""",
            {"id": run_id},
        )
        events = data["logsForRun"]["events"]
        return "\n".join(json.dumps(e) for e in events if e["__typename"] != "MessageEvent" and len(e) > 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen) -> None:
    """Ctrl-C for `dagster dev` (it maps SIGTERM to SIGINT and stops its webserver and daemon),
    then SIGKILL whatever is left of its process group: code servers, run workers."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is its pid
        except ProcessLookupError:
            return
        proc.poll()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tiny_data, tiny_clip_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(settings.PACKAGE_DIR / "deploy" / "dagster.yaml", home / "dagster.yaml")
    port, log = free_port(), root / "dagster-dev.log"
    env = os.environ | {
        "DAGSTER_HOME": str(home),
        "MMCTR_STATE_DIR": str(root / "state"),
        "MMCTR_DATA_DIR": str(tiny_data),
        "MMCTR_OUTPUT_DIR": str(root / "outputs"),
        "MMCTR_CLIP_MODEL": str(tiny_clip_dir),
        "MMCTR_EXECUTOR": "in_process",  # no interpreter start per step on a 2-core runner
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(DAGSTER), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            # a shell without job control starts background jobs with SIGINT ignored; dagster dev
            # needs it to shut down on SIGTERM
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    srv = Server(port=port, root=root, log=log, outputs=root / "outputs")
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"dagster dev exited with {proc.returncode}:\n{srv.log_tail()}"
            assert time.monotonic() < deadline, f"code location not loaded after 240s:\n{srv.log_tail()}"
            try:
                entries = srv.graphql("{ workspaceOrError { ... on Workspace "
                                      "{ locationEntries { name loadStatus } } } }")
                if any(e["loadStatus"] == "LOADED" for e in entries["workspaceOrError"]["locationEntries"]):
                    break
            except OSError:
                pass
            time.sleep(1)
        yield srv
    finally:
        stop_process_group(proc)
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(log, ARTIFACTS / "dagster-dev.log")
    with pytest.raises(ProcessLookupError):  # nothing we started is left running
        os.killpg(proc.pid, 0)


def test_code_location_loads_every_asset_readably(server):
    data = server.graphql(
        """{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
               locationOrLoadError { __typename ... on PythonError { message } } } } }
             assetNodes { assetKey { path } groupName description kinds isPartitioned
               owners { ... on TeamAssetOwner { team } ... on UserAssetOwner { email } } } }"""
    )
    (location,) = data["workspaceOrError"]["locationEntries"]
    assert (location["name"], location["locationOrLoadError"]["__typename"]) == ("mmctr", "RepositoryLocation")
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    assert set(nodes) == ASSETS
    for name, node in nodes.items():
        assert node["groupName"] in GROUPS, name
        assert len(node["description"] or "") > 30, f"{name} needs a description a newcomer can read"
        assert node["kinds"] and node["owners"], name
    assert [n for n, node in nodes.items() if node["isPartitioned"]] == ["clip_embeddings"]

    instigators = server.graphql(
        """{ repositoriesOrError { ... on RepositoryConnection { nodes {
               jobs { name } schedules { name scheduleState { status } }
               sensors { name sensorState { status } } } } } }"""
    )["repositoriesOrError"]["nodes"][0]
    assert {"retrain_job", "full_refresh_job", "clip_shards_job"} <= {j["name"] for j in instigators["jobs"]}
    states = {s["name"]: s["scheduleState"]["status"] for s in instigators["schedules"]}
    states |= {s["name"]: s["sensorState"]["status"] for s in instigators["sensors"]}
    # nothing that starts training is on until someone turns it on; automation is
    assert states == {"weekly_retrain": "STOPPED", "raw_data_sensor": "STOPPED", "automation_sensor": "RUNNING"}


def materialization_counts(server: Server) -> dict[str, dict]:
    data = server.graphql(
        """{ assetNodes { assetKey { path } assetMaterializations(limit: 100) { partition runId } } }"""
    )
    counts = {}
    for node in data["assetNodes"]:
        per_partition: dict = {}
        for m in node["assetMaterializations"]:
            per_partition[m["partition"]] = per_partition.get(m["partition"], 0) + 1
        counts["/".join(node["assetKey"]["path"])] = per_partition
    return counts


def test_whole_graph_materialises_from_the_ui(server):
    run_id = server.client().submit_job_execution(
        "full_refresh_job", run_config=RUN_CONFIG, tags=all_shards_tags()
    )
    status = server.wait_for_run(run_id)
    assert status == "SUCCESS", server.run_failure(run_id)
    counts = materialization_counts(server)
    assert counts["clip_embeddings"] == {k: 1 for k in SHARDS}
    assert all(counts[a] == {None: 1} for a in ASSETS - ON_DEMAND - {"clip_embeddings"}), counts
    assert counts["ctr_tuning"] == {}
    with zipfile.ZipFile(server.outputs / "submission.zip") as zf:
        assert zf.namelist() == ["prediction.csv"]
        assert zf.read("prediction.csv").decode().splitlines()[0] == "ID,Task2"


def automation_ticks(server: Server) -> int:
    return server.log.read_text(errors="replace").count("Finished auto-materialization tick")


def test_one_reencoded_shard_makes_downstream_stale_and_automation_refreshes_it(server):
    # Let one automation tick pass first: a tick that sees the previous full run's downstream
    # materialisations and this shard's update together counts the downstream as handled.
    ticks, deadline = automation_ticks(server), time.monotonic() + 120
    while automation_ticks(server) == ticks:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(1)
    run_id = server.client().submit_job_execution(
        "clip_shards_job", run_config=RUN_CONFIG, tags={"dagster/partition": "2"}
    )
    assert server.wait_for_run(run_id) == "SUCCESS", server.run_failure(run_id)

    stale = server.graphql(
        """{ assetNodes(assetKeys: [{path: ["fused_item_embeddings"]}]) {
               staleStatus staleCauses { key { path } category } } }"""
    )["assetNodes"][0]
    assert stale["staleStatus"] == "STALE"
    assert {"/".join(c["key"]["path"]) for c in stale["staleCauses"]} == {"clip_embeddings"}

    # the automation sensor (on by default, 30 s ticks) refreshes what is downstream: in one run,
    # or in two when a tick sees part of the graph just updated by the previous run
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        runs = server.graphql(
            """{ runsOrError(filter: {tags: [{key: "dagster/sensor_name", value: "automation_sensor"}]}) {
                   ... on Runs { results { runId status assetSelection { path } } } } }"""
        )["runsOrError"]["results"]
        counts = materialization_counts(server)
        done = all(r["status"] in ("SUCCESS", "FAILURE", "CANCELED") for r in runs)
        if done and (all(counts[a] == {None: 2} for a in DOWNSTREAM) or any(r["status"] != "SUCCESS" for r in runs)):
            break
        assert time.monotonic() < deadline, (runs, counts, server.log_tail())
        time.sleep(3)
    for run in runs:
        assert run["status"] == "SUCCESS", server.run_failure(run["runId"])
    refreshed = [("/".join(a["path"])) for r in runs for a in r["assetSelection"]]
    assert sorted(refreshed) == sorted(DOWNSTREAM)  # each downstream asset once, nothing else
    assert counts["clip_embeddings"] == {"0": 1, "1": 1, "2": 2, "3": 1}  # the other shards untouched
    assert all(counts[a] == {None: 1} for a in ASSETS - DOWNSTREAM - ON_DEMAND - {"clip_embeddings"})


def test_asset_graph_in_chromium(server):
    chromium = chromium_or_skip()  # skips, saying how to get it, where there is no browser
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS)
        try:
            # a viewport large enough for full asset nodes; groups expanded, top-to-bottom layout,
            # and the community pop-up marked as seen, as a returning user has them
            context = browser.new_context(viewport={"width": 3000, "height": 2400})
            groups = ",".join(f"global@global:{g}" for g in sorted(GROUPS))
            context.add_init_script(
                "localStorage.setItem('communityNux', '\"1\"');"
                "localStorage.setItem('asset-graph-direction', '\"vertical\"');"
                "localStorage.setItem('asset-graph-open-graph-nodes-global-__GLOBAL__', "
                f"JSON.stringify({{expanded: '{groups}'}}));"
            )
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{server.port}/asset-groups", wait_until="networkidle", timeout=120_000)
            for name in sorted(ASSETS):
                expect(page.get_by_text(name, exact=True)).to_be_visible(timeout=60_000)
            for group in GROUPS:
                expect(page.get_by_text(group, exact=True).last).to_be_visible()
            # every node shows its materialised state: a status row, or the shards' fill for CLIP
            expect(page.get_by_text("Materialized", exact=True)).to_have_count(len(ASSETS - ON_DEMAND) - 1,
                                                                               timeout=60_000)
            expect(page.get_by_text("100% filled", exact=True)).to_be_visible()
            shot = ARTIFACTS / "asset_graph.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 50_000
        finally:
            browser.close()
