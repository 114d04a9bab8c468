"""The GPU pool: every asset that computes on the accelerator is in pool "gpu", and the instance
config we ship (deploy/dagster.yaml) lets one such step run at a time across all runs."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml

from mmctr_assets import settings
from mmctr_assets.definitions import defs
from mmctr_assets.instance import local_instance

SHIPPED_INSTANCE = settings.PACKAGE_DIR / "deploy" / "dagster.yaml"
DAGSTER = Path(sys.executable).with_name("dagster")

# Two stand-in GPU steps. Each records when it holds the GPU and waits (up to BARRIER_S) for the
# other to start, so without a pool limit the two steps always overlap.
GPU_STEPS = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    import dagster as dg

    LOG, BARRIER_S = Path(os.environ["POOL_TEST_LOG"]), 8.0

    def gpu_step(name, peer):
        @dg.asset(name=name, pool="gpu")
        def _step():
            (LOG / f"{name}.start").write_text(repr(time.time()))
            deadline = time.time() + BARRIER_S
            while not (LOG / f"{peer}.start").exists() and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            (LOG / f"{name}.end").write_text(repr(time.time()))
        return _step

    # in-process: no per-step interpreter start; pool slots are claimed the same way
    defs = dg.Definitions(
        assets=[gpu_step("train_a", "train_b"), gpu_step("train_b", "train_a")], executor=dg.in_process_executor
    )
    """
)


def test_assets_on_the_compute_device_are_in_the_gpu_pool():
    assets = {a.key.to_user_string(): a for a in defs.resolve_asset_graph().assets_defs}
    uses_device = {k for k, a in assets.items() if "compute" in a.required_resource_keys}
    in_pool = {k for k, a in assets.items() if a.op.pool == "gpu"}
    assert uses_device == in_pool == {"clip_embeddings", "ctr_tuning", "dcn_din_model", "predictions", "task1_score"}
    assert {a.op.pool for k, a in assets.items() if k not in in_pool} == {None}


def test_shipped_instance_limits_every_pool_to_one():
    config = yaml.safe_load(SHIPPED_INSTANCE.read_text())
    assert config["concurrency"]["pools"]["default_limit"] == 1
    with dg.instance_for_test(overrides=config) as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1


def run_two_gpu_runs(tmp_path: Path, pool_limit: int) -> dict[str, tuple[float, float]]:
    """Launch two runs at once, each with one GPU step, on an instance with the shipped config
    (pool limit overridden when `pool_limit` differs); return each step's (start, end)."""
    home, log = tmp_path / f"home-{pool_limit}", tmp_path / f"log-{pool_limit}"
    home.mkdir()
    log.mkdir()
    config = yaml.safe_load(SHIPPED_INSTANCE.read_text())
    config["concurrency"]["pools"]["default_limit"] = pool_limit
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    module = tmp_path / "gpu_steps.py"
    module.write_text(GPU_STEPS)
    env = os.environ | {"DAGSTER_HOME": str(home), "POOL_TEST_LOG": str(log)}
    # create the storage once, so the two runs do not race to create the sqlite tables
    subprocess.run([sys.executable, "-c", "import dagster as dg; dg.DagsterInstance.get().get_runs()"], env=env,
                   check=True)
    procs = [
        subprocess.Popen([str(DAGSTER), "asset", "materialize", "-f", str(module), "--select", name],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name in ("train_a", "train_b")
    ]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return {n: (float((log / f"{n}.start").read_text()), float((log / f"{n}.end").read_text()))
            for n in ("train_a", "train_b")}


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return min(a[1], b[1]) - max(a[0], b[0])


def test_two_runs_never_hold_the_gpu_at_once(tmp_path):
    steps = run_two_gpu_runs(tmp_path, pool_limit=1)
    assert overlap(steps["train_a"], steps["train_b"]) < 0, json.dumps(steps)
    # control: with room for two, the same runs do overlap, so the check above can fail
    steps = run_two_gpu_runs(tmp_path, pool_limit=2)
    assert overlap(steps["train_a"], steps["train_b"]) > 0, json.dumps(steps)


# A GPU step that holds the slot for HOLD_S seconds and records its pid in MARK.
HOLD_GPU = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    import dagster as dg

    @dg.asset(pool="gpu")
    def train():
        Path(os.environ["MARK"]).write_text(str(os.getpid()))
        time.sleep(float(os.environ["HOLD_S"]))

    defs = dg.Definitions(assets=[train])
    """
)
WAIT_S = 240  # generous bound for every wait below; nothing depends on how fast a step is


class Launched:
    """A `dagster asset materialize` of the GPU step in its own session, output in a file."""

    def __init__(self, tmp_path: Path, env: dict, name: str, hold_s: float):
        self.mark, self.log = tmp_path / f"{name}.pid", tmp_path / f"{name}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [str(DAGSTER), "asset", "materialize", "-f", str(tmp_path / "hold_gpu.py"), "--select", "train"],
                env=env | {"MARK": str(self.mark), "HOLD_S": str(hold_s)}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_for(self, what, done) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done():
            assert self.proc.poll() is None or done(), (f"exited ({self.proc.returncode}) before {what}:\n"
                                                        f"{self.output()}")
            assert time.monotonic() < deadline, f"no {what} after {WAIT_S}s:\n{self.output()}"
            time.sleep(0.5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"not finished after {WAIT_S}s:\n{self.output()}")

    def kill_all(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def gpu_slots(home: Path) -> tuple[int, int]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        info = instance.event_log_storage.get_concurrency_info("gpu")
        return len(info.claimed_slots), info.pending_step_count


def kill_run_worker(run: Launched) -> int:
    """kill -9 of the run's own process only: its step subprocess lives on (and is still training)."""
    run.wait_for("step start", run.mark.exists)
    step_pid = int(run.mark.read_text())
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait()
    return step_pid


def run_id_of(home: Path, launched: Launched) -> str:
    """The run id a launched materialisation printed (RUN_START line)."""
    launched.wait_for("run start", lambda: "RUN_START" in launched.output())
    line = next(x for x in launched.output().splitlines() if "RUN_START" in x)
    return line.split(" - ")[4]


def warnings_of(home: Path, run_id: str) -> list[str]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return [e.message for e in instance.all_logs(run_id) if e.level >= logging.WARNING]


@pytest.mark.slow
def test_a_killed_run_gives_back_the_gpu_with_or_without_the_daemon(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(SHIPPED_INSTANCE, home / "dagster.yaml")  # as shipped: instance class, launcher, monitoring
    (tmp_path / "hold_gpu.py").write_text(HOLD_GPU)
    env = os.environ | {"DAGSTER_HOME": str(home)}
    subprocess.run([sys.executable, "-c", "import dagster as dg; dg.DagsterInstance.get().get_runs()"], env=env,
                   check=True)
    started: list[Launched] = []
    daemon = None

    def launch(name: str, hold_s: float) -> Launched:
        started.append(Launched(tmp_path, env, name, hold_s))
        return started[-1]

    try:
        # 1. No daemon. A live holder is waited for: the waiting runs look at it and leave it alone.
        holder = launch("holder1", hold_s=3600)
        holder_id = run_id_of(home, holder)
        holder.wait_for("step start", holder.mark.exists)
        waiting, cancelled = launch("waiting1", hold_s=0), launch("cancelled1", hold_s=0)
        for run in (waiting, cancelled):
            run.wait_for("pool wait", lambda run=run: "Step blocked by limit for pool gpu" in run.output())
        time.sleep(local_instance.CHECK_EVERY_S + 2)  # past a second look at the holder
        assert gpu_slots(home) == (1, 2) and holder.proc.poll() is None
        # a waiting run stops on SIGTERM, and gives up its place in the queue
        cancelled.proc.terminate()
        assert cancelled.finish() != 0 and "DagsterExecutionInterruptedError" in cancelled.output()
        assert gpu_slots(home) == (1, 1)
        # the holder dies (kill -9): the waiting run frees its slot itself, says so at WARNING, and goes on
        orphan = kill_run_worker(holder)
        assert waiting.finish() == 0, waiting.output()
        assert waiting.mark.exists() and not psutil.pid_exists(orphan)  # the leftover step was stopped
        waiting_id = run_id_of(home, waiting)
        said = [m for m in warnings_of(home, waiting_id) if holder_id in m]
        assert said and "marked FAILURE" in said[0] and "freed pool slot(s) ['gpu/train']" in said[0], said
        assert holder_id in waiting.output()  # on the console too
        assert gpu_slots(home) == (0, 0)

        # 2. No daemon, nobody waiting: the dead run holds the slot until mmctr-free-dead-runs frees it.
        dead = launch("dead2", hold_s=3600)
        orphan = kill_run_worker(dead)
        free = [str(DAGSTER.with_name("mmctr-free-dead-runs"))]
        looked = subprocess.run(free + ["--dry-run"], env=env, capture_output=True, text=True, timeout=WAIT_S)
        assert looked.returncode == 0 and "would: " in looked.stdout, looked.stdout + looked.stderr
        assert gpu_slots(home) == (1, 0) and psutil.pid_exists(orphan)  # a dry run changes nothing
        freed = subprocess.run(free, env=env, capture_output=True, text=True, timeout=WAIT_S)
        assert freed.returncode == 0, freed.stderr
        assert "marked FAILURE" in freed.stdout and "freed pool slot(s) ['gpu/train']" in freed.stdout, freed.stdout
        assert gpu_slots(home) == (0, 0) and not psutil.pid_exists(orphan)

        # 3. With the daemon (what `make dev` runs), nobody waiting: run monitoring frees the slot.
        with open(tmp_path / "daemon.log", "w") as out:
            daemon = subprocess.Popen([str(DAGSTER.with_name("dagster-daemon")), "run",
                                       "-f", str(tmp_path / "hold_gpu.py")],
                                      env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        dead = launch("dead3", hold_s=3600)
        dead_id = run_id_of(home, dead)
        orphan = kill_run_worker(dead)
        deadline = time.monotonic() + WAIT_S
        while gpu_slots(home) != (0, 0):
            assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(1)
        assert not psutil.pid_exists(orphan)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            status = {r.run_id: r.status for r in instance.get_runs()}
        assert (status[holder_id], status[waiting_id], status[dead_id]) == (
            dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)
    finally:
        for run in started:
            run.kill_all()
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()


def test_cpu_heavy_steps_share_the_cores(tmp_path, monkeypatch):
    """cpu_cores: a step takes the free cores without waiting, waits only below its minimum, and
    its cores come back when it ends (so clip_embeddings and item2vec never oversubscribe)."""
    import logging
    import threading

    from mmctr_assets.defs.common import cpu_cores
    from mmctr_assets.lib.embeddings import clip

    monkeypatch.setattr(clip, "available_cpus", lambda: 3)
    log = logging.getLogger("test")
    with cpu_cores(log, tmp_path, want=1, need=1) as item2vec_cores:  # item2vec with one worker
        assert item2vec_cores == 1
        with cpu_cores(log, tmp_path) as clip_cores:  # clip beside it: what is left
            assert clip_cores == 2
            got = []
            waiter = threading.Thread(target=lambda: got.append(cpu_cores(log, tmp_path, need=2).__enter__()))
            waiter.start()
            waiter.join(1.0)
            assert waiter.is_alive() and not got  # no 2 cores free: it waits
        waiter.join(10)
        assert got == [2]  # clip's two cores came back


def test_the_freed_slot_warning_prints_with_time_and_level_on_the_cli():
    """issue 29: the waiting run's console line says when and at which level, as Dagster's own lines do."""
    import re

    code = ("from mmctr_assets.instance import local_instance as li; "
            "li.log.warning(\"pool 'gpu': the slot this step waited for was held by a dead run\")")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} - mmctr_assets\.instance\.local_instance - "
                        r"WARNING - pool 'gpu': the slot this step waited for was held by a dead run", line), line
    assert done.stderr.count("held by a dead run") == 1  # printed once, not again by the root logger
