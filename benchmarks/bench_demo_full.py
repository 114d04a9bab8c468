"""How long does each step of a real Dagster run take, and how much memory does it hold?

Runs a command that materialises assets through the Dagster CLI (default ``make demo-full``: the
whole graph at full size, as a user runs it), samples the resident memory of every process it
starts once a second, and afterwards reads the runs' event logs from the Dagster instance
(``$DAGSTER_HOME``): each step's wall time (STEP_START to STEP_SUCCESS / STEP_FAILURE) and its
peak RSS (the largest sampled sum over the step's process and its children; the multiprocess
executor runs each step in its own process, whose pid the STEP_START event records). One JSON
line per step, then one for the whole command.

    .venv/bin/python benchmarks/bench_demo_full.py [--command "make demo-full"] [--interval 1]

Run it on an idle machine; the figures go to docs/results.md with the date and ``uptime``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of ``proc`` and all its descendants (0 for what exited meanwhile)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_sampled(command: list[str], interval: float) -> tuple[int, float, dict[int, int]]:
    """Run ``command``; -> (exit code, wall seconds, {pid: peak RSS of its process tree})."""
    start = time.time()
    root = psutil.Process(subprocess.Popen(command).pid)
    peaks: dict[int, int] = {}
    while root.is_running() and root.status() != psutil.STATUS_ZOMBIE:
        for p in root.children(recursive=True):
            try:
                peaks[p.pid] = max(peaks.get(p.pid, 0), tree_rss(p))
            except psutil.Error:
                pass
        time.sleep(interval)
    return root.wait(), time.time() - start, peaks


def step_records(since: float) -> list[dict]:
    """Per step of every run created after ``since``: key, pid, start/end time, outcome."""
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        runs = [r for r in instance.get_run_records() if r.create_timestamp.timestamp() >= since]
        steps = []
        for record in sorted(runs, key=lambda r: r.create_timestamp):
            started: dict[str, tuple[float, int | None]] = {}
            for entry in instance.all_logs(record.dagster_run.run_id):
                event = entry.dagster_event
                if event is None or event.step_key is None:
                    continue
                kind = event.event_type_value
                if kind == "STEP_START":
                    started[event.step_key] = (entry.timestamp, event.pid)
                elif kind in ("STEP_SUCCESS", "STEP_FAILURE") and event.step_key in started:
                    t0, pid = started[event.step_key]
                    steps.append({"run": record.dagster_run.run_id[:8], "step": event.step_key, "pid": pid,
                                  "start": t0, "wall_s": round(entry.timestamp - t0, 1),
                                  "outcome": kind.removeprefix("STEP_").lower()})
        return steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--command", default="make demo-full", help="what to run (a shell-like string)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    args = ap.parse_args(argv)
    if "DAGSTER_HOME" not in os.environ:  # make's default instance (Makefile: $(STATE)/dagster_home)
        os.environ["DAGSTER_HOME"] = str(Path(".mmctr/dagster_home").resolve())
    since = time.time()
    code, wall, peaks = run_sampled(shlex.split(args.command), args.interval)
    steps = step_records(since)
    first = min((s["start"] for s in steps), default=since)
    for s in steps:
        emit(bench="demo_full_step", run=s["run"], step=s["step"], outcome=s["outcome"], wall_s=s["wall_s"],
             started_after_s=round(s["start"] - first, 1),
             peak_rss_mb=round(peaks[s["pid"]] / 2**20) if s["pid"] in peaks else None)
    emit(bench="demo_full", command=args.command, exit_code=code, wall_s=round(wall, 1),
         wall_min=round(wall / 60, 1), goal_min=30, meets_goal=code == 0 and wall <= 30 * 60, steps=len(steps))


if __name__ == "__main__":
    main()
