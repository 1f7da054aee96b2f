"""The learner's CPU share: its own share of threads while the server works, every core while
the server has been idle for a while, its share when the server cannot be read."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from learner.cores import QUIET_S, CpuShare, process_cpu_seconds


class FakeServer:
    """A clock and a server CPU-time counter the test moves by hand."""

    def __init__(self) -> None:
        self.now, self.cpu = 100.0, 5.0

    def run(self, seconds: float, cores: float) -> None:
        self.now += seconds
        self.cpu += seconds * cores


def share_with(server: FakeServer) -> CpuShare:
    return CpuShare(1234, busy_threads=1, idle_threads=4, clock=lambda: server.now,
                    cpu_seconds=lambda pid: server.cpu)


def test_every_core_while_the_server_is_idle_its_share_while_it_works():
    server = FakeServer()
    share = share_with(server)
    server.run(1.0, cores=0.02)  # polls and heartbeats only
    assert share.threads() == 4
    server.run(0.5, cores=1.8)  # a pair being sampled
    assert share.threads() == 1
    server.run(QUIET_S / 2, cores=0.0)  # idle again, but only just
    assert share.threads() == 1
    server.run(QUIET_S, cores=0.0)
    assert share.threads() == 4


def test_a_server_that_cannot_be_read_keeps_the_learner_to_its_share():
    server = FakeServer()
    readings = iter([1.0, None, 2.0, 2.0])
    share = CpuShare(1234, busy_threads=2, idle_threads=8, clock=lambda: server.now,
                     cpu_seconds=lambda pid: next(readings))
    server.run(1.0, cores=0.0)
    assert share.threads() == 2  # gone: no reading
    server.run(1.0, cores=0.0)
    assert share.threads() == 2  # no earlier reading to compare with
    server.run(1.0, cores=0.0)
    assert share.threads() == 8


def test_the_share_never_exceeds_every_core():
    assert CpuShare(os.getpid(), busy_threads=3, idle_threads=2).idle_threads == 3


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="no /proc: not Linux")
def test_process_cpu_seconds_reads_a_busy_child():
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        before = process_cpu_seconds(child.pid)
        time.sleep(1.0)
        after = process_cpu_seconds(child.pid)
    finally:
        child.kill()
        child.wait()
    assert before is not None and after - before > 0.2
    assert process_cpu_seconds(child.pid) is None  # reaped: gone


def test_apply_sets_torchs_thread_count():
    server = FakeServer()
    share = share_with(server)
    threads = torch.get_num_threads()
    try:
        server.run(1.0, cores=2.0)
        share.apply()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_the_learners_share_is_half_the_cores_this_process_may_use(tmp_path, monkeypatch):
    """The server gives the learner child half the cores it may run on (its CPU affinity, as
    in a container limited to some cores), not half the machine's; --learner-threads wins."""
    from chatbot.config import Config
    from chatbot.learner_process import LearnerProcess

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert LearnerProcess(Config(data_dir=tmp_path), store=None).threads() == 3
    config = Config(data_dir=tmp_path, learner_threads=5)
    assert LearnerProcess(config, store=None).threads() == 5
