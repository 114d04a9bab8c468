"""A run that dies (kill -9, OOM, power loss) gives back its GPU pool slot, on a one-machine instance.

Pool slots are rows in the instance database: a step claims one before it starts and the process
that coordinates the run frees it when the step ends. A coordinator killed with SIGKILL frees
nothing, and Dagster 1.13 does not notice on its own: the run stays STARTED forever and holds
pool "gpu", so every later GPU step waits ("Step blocked by limit for pool gpu"). Dagster's run
monitoring (the daemon) fails such runs only when the run launcher can check its workers, and the
default launcher cannot; `run_monitoring.free_slots_after_run_end_seconds` then frees the slots of
runs that ended without freeing them.

So the local instance (deploy/dagster.yaml) uses `LocalRunLauncher`: Dagster's default launcher
plus a worker check that looks up the processes the run recorded (the pids in its engine events)
on this machine. With the daemon running (`make dev`, `dagster dev`, `dagster-daemon run`) a dead
run is marked FAILURE within `poll_interval_seconds` and its slots are free
`free_slots_after_run_end_seconds` later. Without a daemon, `mmctr-free-dead-runs` does the same
once, at once.

A run whose coordinator is gone but whose step process lives on (kill -9 of `dagster asset
materialize` alone leaves its step subprocess running, still training) is dead too: nothing would
record or free what that step does, and it would race the next run for the GPU and the checkpoint.
Its leftover step processes are stopped (SIGTERM, then SIGKILL) when the run is marked failed.

Only for an instance whose runs all execute on this machine (sqlite storage, default launcher):
a pid means nothing on another host. Production (Kubernetes) has its launcher's own worker check.
"""

import argparse
import sys
import time
from dataclasses import dataclass, field

import dagster as dg
import psutil
from dagster._core.events import DagsterEventType
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.launcher.default_run_launcher import DefaultRunLauncher
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter

STOP_GRACE_S = 10.0
# a process that started after its pid was recorded is another process that got the same pid
PID_CLOCK_SLACK_S = 1.0


@dataclass
class RunWorkers:
    """The processes a run recorded, and which of them are still alive on this machine."""

    run_id: str
    coordinators: list[int] = field(default_factory=list)  # run worker(s): claim and free pool slots
    alive_coordinators: list[int] = field(default_factory=list)
    alive_steps: list[int] = field(default_factory=list)  # step subprocesses still running

    @property
    def dead(self) -> bool:
        """No recorded coordinator is alive. A run that recorded none yet is not judged."""
        return bool(self.coordinators) and not self.alive_coordinators

    def describe(self) -> str:
        gone = ", ".join(str(p) for p in self.coordinators)
        text = f"run worker process {gone} is gone (killed or crashed) without ending the run"
        if self.alive_steps:
            text += f"; its leftover step process(es) {self.alive_steps} were stopped"
        return text


def _alive(pid: int, recorded_at: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= recorded_at + PID_CLOCK_SLACK_S
    except psutil.Error:
        return False


def inspect_run(instance: dg.DagsterInstance, run_id: str) -> RunWorkers:
    """The run's processes from its event log: engine events of the executor and of the process
    a launcher started carry the run worker's pid; STEP_WORKER_STARTED carries each step's."""
    workers = RunWorkers(run_id)
    entries = instance.all_logs(run_id, of_type={DagsterEventType.ENGINE_EVENT, DagsterEventType.STEP_WORKER_STARTED})
    for entry in entries:
        event = entry.dagster_event
        metadata = (getattr(event.event_specific_data, "metadata", None) if event else None) or {}
        if "pid" not in metadata:
            continue
        pid = int(metadata["pid"].value)
        alive = _alive(pid, entry.timestamp)
        if event.event_type == DagsterEventType.STEP_WORKER_STARTED:
            if alive and pid not in workers.alive_steps:
                workers.alive_steps.append(pid)
        elif pid not in workers.coordinators:
            workers.coordinators.append(pid)
            if alive:
                workers.alive_coordinators.append(pid)
    return workers


def stop_processes(pids: list[int]) -> None:
    """SIGTERM each process and its children, SIGKILL what is left after STOP_GRACE_S."""
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
        except psutil.Error:
            pass
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=STOP_GRACE_S)


class LocalRunLauncher(DefaultRunLauncher):
    """Dagster's default launcher, plus the worker check run monitoring needs (module docstring).

    Configure with `run_monitoring: {enabled: true, max_resume_run_attempts: 0}`: a dead worker's
    run is failed, not resumed (the next materialisation resumes training from its checkpoint)."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        workers = inspect_run(self._instance, run.run_id)
        if not workers.dead:
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        stop_processes(workers.alive_steps)
        return CheckRunHealthResult(WorkerStatus.FAILED, workers.describe())


def check_local_instance(instance: dg.DagsterInstance) -> str | None:
    """Why pids recorded in this instance cannot be checked from here, or None when they can."""
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

    if not isinstance(instance.event_log_storage, SqliteEventLogStorage):
        return (f"this instance ({instance.root_directory}) keeps its runs in "
                f"{type(instance.event_log_storage).__name__}, which other machines may write to; a pid "
                "recorded there cannot be checked from here. Use the daemon's run monitoring with a "
                "launcher that checks its workers (K8sRunLauncher does), docs/operations.md 'One GPU, one step'.")
    if not isinstance(instance.run_launcher, DefaultRunLauncher):
        return f"this instance launches runs with {type(instance.run_launcher).__name__}, not on this machine"
    return None


def free_run_if_dead(instance: dg.DagsterInstance, run_id: str, by: str, dry_run: bool = False) -> str | None:
    """If the run's processes on this machine are gone, mark it FAILURE (stopping its leftover step
    processes); if it is finished (now or before) but still holds pool slots or claims, free them.
    Returns one line saying what was done (or, with dry_run, would be), None for a live run."""
    run = instance.get_run_by_id(run_id)
    done = []
    if run is not None and not run.is_finished:
        workers = inspect_run(instance, run_id)
        if not workers.dead:
            return None  # a live run holds or waits for its slots
        if not dry_run:
            stop_processes(workers.alive_steps)
            instance.report_run_failed(run, f"{by}: {workers.describe()}.")
        done.append(f"{workers.describe()}; marked FAILURE")
    storage = instance.event_log_storage
    if run_id in storage.get_concurrency_run_ids():
        held = [
            f"{info.concurrency_key}/{s.step_key}"
            for key in sorted(storage.get_concurrency_keys())
            for info in [storage.get_concurrency_info(key)]
            for s in info.claimed_slots
            if s.run_id == run_id
        ]
        if not dry_run:
            storage.free_concurrency_slots_for_run(run_id)
        done.append(f"freed pool slot(s) {held or '(pending claims only)'}")
    if not done:
        return None
    status = "FAILURE" if run is not None and not run.is_finished else run.status.value if run else "deleted"
    job = f"{run.job_name}, " if run else ""
    return f"run {run_id} ({job}{status}): " + "; ".join(done)


def free_dead_runs(instance: dg.DagsterInstance, dry_run: bool = False) -> list[str]:
    """free_run_if_dead for every run in progress and every run that holds pool slots or claims.
    Returns one line per run something was (or, with dry_run, would be) done to."""
    in_progress = instance.get_run_records(
        RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING])
    )
    run_ids = [r.dagster_run.run_id for r in in_progress]
    run_ids += [rid for rid in sorted(instance.event_log_storage.get_concurrency_run_ids()) if rid not in run_ids]
    lines = (free_run_if_dead(instance, rid, "mmctr-free-dead-runs", dry_run) for rid in run_ids)
    return [line for line in lines if line]


def pool_summary(instance: dg.DagsterInstance) -> str:
    storage = instance.event_log_storage
    parts = []
    for key in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(key)
        parts.append(f"{key}: {len(info.claimed_slots)}/{info.slot_count} slot(s) occupied, "
                     f"{info.pending_step_count} step(s) waiting")
    return "; ".join(parts) or "no pools in use"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmctr-free-dead-runs",
        description="Fail the runs of this machine's Dagster instance ($DAGSTER_HOME) whose processes are "
        "gone (kill -9, crash), stop what is left of them, and free the pool slots they hold, so waiting "
        "GPU steps proceed. The daemon (make dev) does this by itself; this is for a machine without one.",
    )
    parser.add_argument("--dry-run", action="store_true", help="only say what would be done")
    args = parser.parse_args(argv)
    with dg.DagsterInstance.get() as instance:
        problem = check_local_instance(instance)
        if problem:
            print(f"mmctr-free-dead-runs: not done: {problem}", file=sys.stderr)
            return 2
        started = time.monotonic()
        done = free_dead_runs(instance, dry_run=args.dry_run)
        for line in done:
            print(("would: " if args.dry_run else "") + line)
        if not done:
            print("no dead runs and no slots held by finished runs")
        print(f"pools: {pool_summary(instance)} ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
