"""The CPU cores a process may really use, and a machine-wide lease of them.

Each CPU-heavy step (a training, CLIP encoding, item2vec) runs a thread per core it holds. Two
processes that each spawn a thread per machine core oversubscribe it: on 2 shared cores both run
many times slower than alone, not 2x (docs/results.md). So each core is a lock file in one folder
per machine (``MMCTR_CPU_LOCK_DIR``, default ``<tmp>/mmctr-cpu-cores``), whatever output folder,
Dagster run or script the process belongs to: a lease takes up to ``want`` free cores without
waiting and waits only while fewer than ``need`` are free. Locks are ``flock``s, so a process that
dies gives its cores back. The number of cores is the process's affinity mask, capped by a cgroup
CPU quota (containers).

Thread counts then depend on what else runs; a training that must be bit-reproducible across
loads pins ``TrainConfig.num_threads`` (it still leases that many cores).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_DIR_ENV = "MMCTR_CPU_LOCK_DIR"
_held = {"cores": 0}  # cores this process holds by leases (work inside them takes no more)
_held_lock = threading.Lock()


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Whole cores a cgroup CPU quota allows (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.floor(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else max(1, quota // period)
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """Cores this process may run on: its affinity mask (not the machine's count), capped by a
    cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


def lock_dir() -> Path:
    """The machine's lease folder: ``$MMCTR_CPU_LOCK_DIR`` or ``<tmp>/mmctr-cpu-cores``."""
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "mmctr-cpu-cores")


def held_cores() -> int | None:
    """Cores this process already holds by leases (None: none): a training inside a step's lease
    runs on those instead of leasing more (or waiting for cores its own process holds)."""
    return _held["cores"] or None


def _try_claim(folder: Path, cores: int, want: int) -> list:
    got = []
    for i in range(cores):
        f = open(folder / f"cpu-{i}.lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got.append(f)
        except BlockingIOError:
            f.close()
        if len(got) == want:
            break
    return got


@contextlib.contextmanager
def core_lease(want: int | None = None, need: int = 1, *, folder: Path | None = None, cores: int | None = None,
               on_wait: Callable[[str], None] | None = None,
               poll: Callable[[], None] | None = None) -> Iterator[int]:
    """Hold up to ``want`` (None: all) of the machine's ``cores`` (default :func:`available_cpus`)
    that are free, at least ``need`` (waiting for them); yields how many. ``on_wait(message)`` is
    told once when it has to wait, and again when it got them. ``poll()`` runs at every retry while
    waiting: whatever it raises ends the wait (a study's spent budget, a cancelled run)."""
    cores = cores or available_cpus()
    want = max(1, min(want or cores, cores))
    need = max(1, min(need, want))
    folder = folder or lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    t0, told = time.perf_counter(), False
    while len(got := _try_claim(folder, cores, want)) < need:
        for f in got:
            f.close()  # closing drops the lock
        if on_wait and not told:
            on_wait(f"waiting for {need} free CPU core(s) of {cores}; other CPU-heavy steps hold them "
                    f"(lib/cores.py, locks in {folder})")
            told = True
        if poll is not None:
            poll()
        time.sleep(0.5)
    if on_wait and told:
        on_wait(f"got {len(got)} CPU core(s) after {time.perf_counter() - t0:.0f}s")
    with _held_lock:
        _held["cores"] += len(got)
    try:
        yield len(got)
    finally:
        with _held_lock:
            _held["cores"] -= len(got)
        for f in got:
            f.close()
