"""The machine-wide core lease (lib/cores.py): concurrent trainings split the cores a process may
use instead of each running a thread per core."""

import fcntl
import os
import threading

import torch

from mmctr_assets.lib import cores
from mmctr_assets.lib.ctr import trainer


def test_a_cgroup_quota_caps_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cores.cgroup_cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cores.cgroup_cpu_limit(tmp_path) is None
    assert cores.cgroup_cpu_limit(tmp_path / "absent") is None
    assert 1 <= cores.available_cpus() <= (os.cpu_count() or 1)


def test_leases_split_the_cores_and_a_third_waits(tmp_path):
    with cores.core_lease(want=1, folder=tmp_path, cores=2) as first:
        with cores.core_lease(folder=tmp_path, cores=2) as second:  # all free ones: what is left
            assert (first, second) == (1, 1)
            got, messages = [], []
            waiter = threading.Thread(target=lambda: got.append(
                cores.core_lease(folder=tmp_path, cores=2, on_wait=messages.append).__enter__()))
            waiter.start()
            waiter.join(1.0)
            assert waiter.is_alive() and not got and "waiting for 1 free CPU core" in messages[0]
        waiter.join(10)
        assert got == [1]


def test_train_takes_its_threads_from_the_lease(tmp_path, monkeypatch):
    monkeypatch.setenv(cores.LOCK_DIR_ENV, str(tmp_path))
    previous = torch.get_num_threads()
    with cores.core_lease(want=1, folder=tmp_path, cores=2):
        with trainer._torch_settings(True, None):  # inside a step's lease: its cores, no more
            assert torch.get_num_threads() == 1
    n = cores.available_cpus()
    other_process = [open(tmp_path / f"cpu-{i}.lock", "a+") for i in range(n)]  # flock is per open file
    for f in other_process:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    started = threading.Event()

    def training():
        with trainer._torch_settings(True, None):
            started.set()

    t = threading.Thread(target=training)
    t.start()
    assert not started.wait(1.0)  # every core is taken: it waits instead of oversubscribing
    for f in other_process:
        f.close()
    t.join(10)
    assert started.is_set() and torch.get_num_threads() == previous
