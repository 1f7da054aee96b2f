"""Thread counts that follow the CPU: the learner's share (its own share of threads while the
server works, every core while the server has been idle for a while, its share when the server
cannot be read) and the server's (every core while the rest of the host is quiet, one thread
while another process keeps it busy, and each sampler thread set to the answer), and the
learner child's scheduling class."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from chatbot.threads import (
    CpuShare,
    host_cpu_seconds,
    host_share,
    in_fresh_thread_on_cpu,
    one_torch_thread,
    process_cpu_seconds,
)
from learner.cores import BUSY_CORES, QUIET_S, learner_share


class FakeServer:
    """A clock and a server CPU-time counter the test moves by hand."""

    def __init__(self) -> None:
        self.now, self.cpu = 100.0, 5.0

    def run(self, seconds: float, cores: float) -> None:
        self.now += seconds
        self.cpu += seconds * cores


def share_with(server: FakeServer) -> CpuShare:
    return CpuShare(1, 4, lambda: server.cpu, busy_cores=BUSY_CORES, quiet_s=QUIET_S,
                    clock=lambda: server.now)


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
    share = CpuShare(2, 8, lambda: next(readings), busy_cores=BUSY_CORES, quiet_s=QUIET_S,
                     clock=lambda: server.now)
    server.run(1.0, cores=0.0)
    assert share.threads() == 2  # gone: no reading
    server.run(1.0, cores=0.0)
    assert share.threads() == 2  # no earlier reading to compare with
    server.run(1.0, cores=0.0)
    assert share.threads() == 8


def test_the_share_never_exceeds_every_core():
    assert learner_share(os.getpid(), busy_threads=3, idle_threads=2).idle_threads == 3


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


def threads_of_a_new_thread() -> int:
    """The torch thread count a thread started now works with."""
    seen = []
    worker = threading.Thread(target=lambda: seen.append((torch.ones(4).sum(),
                                                          torch.get_num_threads())[1]))
    worker.start()
    worker.join()
    return seen[0]


def test_one_torch_thread_gives_the_count_back_for_threads_started_later():
    """torch's count is the process's: a thread started after another set 1 works on one
    thread. The llama.cpp engine's draw runs on one; the threads after it must not."""
    torch.set_num_threads(2)
    try:
        assert threads_of_a_new_thread() == 2
        with one_torch_thread():
            assert torch.get_num_threads() == 1 and threads_of_a_new_thread() == 1
        assert threads_of_a_new_thread() == 2
        with pytest.raises(RuntimeError), one_torch_thread():
            raise RuntimeError("the draw failed")
        assert threads_of_a_new_thread() == 2
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


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


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="no SCHED_IDLE: not Linux")
@pytest.mark.parametrize("sched, policy", [("idle", "SCHED_IDLE"), ("normal", "SCHED_OTHER")])
def test_the_learner_child_runs_in_the_scheduling_class_asked(tmp_path, monkeypatch, sched,
                                                              policy):
    """--learner-sched idle puts the child in SCHED_IDLE: it runs on the time the server
    leaves; normal (the default) keeps the usual class. --learner-nice applies either way."""
    from chatbot.config import Config
    from chatbot.learner_process import LearnerProcess

    config = Config(data_dir=tmp_path, learner_sched=sched, learner_nice=7)
    learner = LearnerProcess(config, store=None)
    monkeypatch.setattr(learner, "argv", lambda: [
        sys.executable, "-c", "import os; print(os.sched_getscheduler(0), os.nice(0))"])
    learner.start()
    assert learner.process.wait(timeout=60) == 0
    got_policy, got_nice = map(int, learner.log_path.read_text().split()[-2:])
    assert got_policy == getattr(os, policy)
    assert got_nice == min(19, os.nice(0) + 7)
    assert Config().learner_sched == "normal"


# The server's share: the rest of the host.

class FakeHost:
    """A clock, the host's CPU seconds and the server's, moved by hand."""

    def __init__(self) -> None:
        self.now, self.host, self.server = 50.0, 1000.0, 20.0

    def run(self, seconds: float, cores: float, server_cores: float = 0.0) -> None:
        self.now += seconds
        self.host += seconds * (cores + server_cores)
        self.server += seconds * server_cores


def server_share_on(host: FakeHost) -> CpuShare:
    """The server's share (`host_share`, 4 cores) reading the fake host instead of /proc."""
    return host_share(4, lambda: [1234], clock=lambda: host.now, host_seconds=lambda: host.host,
                      process_seconds=lambda pid: host.server)


def test_the_server_takes_every_core_on_a_quiet_host_and_one_beside_a_busy_process():
    host = FakeHost()
    share = server_share_on(host)
    host.run(1.0, cores=0.1, server_cores=2.0)  # a browser, a shell; the server's own pair
    assert share.threads() == 4
    host.run(1.0, cores=1.0)  # another server's pair, a training job
    assert share.threads() == 1
    host.run(0.2, cores=0.0)  # looked at again within half a second: the last answer
    assert share.threads() == 1
    host.run(1.0, cores=0.0)  # quiet, but only for a moment
    assert share.threads() == 1
    host.run(share.quiet_s, cores=0.0)
    assert share.threads() == 4


def test_a_neighbour_seen_within_half_a_second_is_acted_on_at_the_next_look():
    host = FakeHost()
    share = server_share_on(host)
    host.run(0.3, cores=2.0)
    assert share.threads() == 4  # too soon to tell: the answer stands
    host.run(0.3, cores=2.0)
    assert share.threads() == 1


def test_a_watched_share_judges_the_last_moments_not_the_pause_before_a_look():
    """A neighbour busy on two cores for its first second, quiet after: three seconds later
    a share looked at only now averages the whole pause (0.67 cores: busy), a watched one
    has seen it quiet for two seconds (every core)."""
    start = time.monotonic()

    def neighbour_seconds() -> float:
        return 2.0 * min(time.monotonic() - start, 1.0)

    def share() -> CpuShare:
        return CpuShare(1, 4, neighbour_seconds, busy_cores=0.5, quiet_s=1.0,
                        min_interval_s=0.2)

    looked_at_once, watched, stop = share(), share(), threading.Event()
    watcher = watched.watch(stop)
    try:
        time.sleep(3.0)
        assert looked_at_once.threads() == 1
        assert watched.threads() == 4
    finally:
        stop.set()
        watcher.join()


def test_a_host_that_cannot_be_read_leaves_the_server_every_core():
    host = FakeHost()
    share = host_share(4, lambda: [1234], clock=lambda: host.now, host_seconds=lambda: None)
    host.run(1.0, cores=2.0)
    assert share.threads() == 4


def test_each_thread_that_applies_the_share_sets_its_own_count(monkeypatch):
    """torch keeps an OpenMP thread count per thread: a second sampler thread running beside
    the first must set it too, though torch.get_num_threads() already says the new count."""
    host = FakeHost()
    share = server_share_on(host)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads",
                        lambda n: calls.append((threading.current_thread().name, n)))
    host.run(1.0, cores=1.5)
    for name in ("pair-1", "pair-2"):
        worker = threading.Thread(target=lambda: (share.apply(), share.apply()), name=name)
        worker.start()
        worker.join()
    assert calls == [("pair-1", 1), ("pair-2", 1)]  # once per thread, not once per apply


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc: not Linux")
def test_the_server_sees_a_busy_neighbour_unless_it_is_named_as_its_own():
    """On the real /proc: a busy process counts as a neighbour unless `own_pids` names it.
    Compared as CPU seconds over the same window, so whatever else the host runs meanwhile
    counts the same on both sides."""
    assert host_cpu_seconds() > 0
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        neighbour = host_share(4, lambda: [os.getpid()])
        own_child = host_share(4, lambda: [os.getpid(), child.pid])
        before = neighbour.neighbour_seconds(), own_child.neighbour_seconds()
        time.sleep(1.5)
        after = neighbour.neighbour_seconds(), own_child.neighbour_seconds()
        assert neighbour.threads() == 1
    finally:
        child.kill()
        child.wait()
    with_child, without_child = after[0] - before[0], after[1] - before[1]
    assert with_child - without_child > 0.5  # the child's second or so, left out on one side


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc: not Linux")
def test_the_learner_keeps_to_its_share_beside_any_busy_process():
    """Not only the server: a busy process of the same or a higher priority leaves the
    learner's spinning OpenMP workers waiting for cores they cannot get."""
    idle_server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        share = learner_share(idle_server.pid, busy_threads=1, idle_threads=4)
        time.sleep(1.0)
        assert share.threads() == 1
    finally:
        for child in (idle_server, busy):
            child.kill()
            child.wait()


def test_a_pair_follows_the_share_at_each_step_with_exact_logprobs(tiny_loaded, tiny_config,
                                                                   monkeypatch):
    """A share that changes its answer mid-pair: the sampler thread's count follows it, and
    the stored log-probs still match a fresh forward pass."""
    from chatbot.sampling import PairGenerator
    from tests.test_sampling import MESSAGES, sequence_logprobs

    answers = iter([2, 2, 1, 1, 2] + [1] * 100)
    share = CpuShare(1, 2, lambda: 0.0, busy_cores=0.5, quiet_s=2.0)
    monkeypatch.setattr(share, "threads", lambda: next(answers))
    sampler_counts = []
    set_num_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (
        sampler_counts.append((threading.current_thread().name, n)), set_num_threads(n)))
    threads = torch.get_num_threads()
    try:
        generator = PairGenerator(tiny_loaded, dataclasses.replace(
            tiny_config, max_new_tokens=8), cpu_share=share)
        torch.manual_seed(3)
        stream = generator.stream(MESSAGES)
        list(stream)
    finally:
        set_num_threads(threads)
    assert sampler_counts[:3] == [("pair-sampler", 2), ("pair-sampler", 1),
                                  ("pair-sampler", 2)]
    for reply in stream.result.replies:
        fresh = sequence_logprobs(tiny_loaded.model, stream.result.prompt_token_ids,
                                  reply.token_ids)
        assert torch.allclose(torch.tensor(reply.token_logprobs), fresh, atol=1e-4)


def test_the_server_follows_the_host_only_on_a_cpu_and_without_threads(tiny_config):
    from app import server_share

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    share = server_share(tiny_config, cpu)
    assert (share.busy_threads, share.idle_threads) == (1, torch.get_num_threads())
    assert server_share(dataclasses.replace(tiny_config, threads=2), cpu) is None
    assert server_share(tiny_config, cuda) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="no /proc: not Linux")
def test_the_server_takes_one_thread_while_its_own_learner_trains(tiny_config):
    """A child of the server's that keeps a core busy - its learner in a round - is a
    neighbour like any other, niced or not: a team of two would wait at each barrier for the
    core the child holds (chatbot/threads.py)."""
    from app import server_share

    share = server_share(tiny_config, torch.device("cpu"))
    learner = subprocess.Popen(["nice", "-n", "10", sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.5)
        assert share.threads() == 1
    finally:
        learner.kill()
        learner.wait()


def test_torch_work_leaves_the_callers_thread_on_a_cpu_only():
    """A fresh thread on a CPU (its OpenMP team ends with it); the caller's on a GPU and where
    no model is in the process; an error comes back to the caller either way."""
    def where() -> threading.Thread:
        return threading.current_thread()

    assert in_fresh_thread_on_cpu(where, "cpu", name="swap").name == "swap"
    assert in_fresh_thread_on_cpu(where, "cuda") is threading.current_thread()
    assert in_fresh_thread_on_cpu(where, "none") is threading.current_thread()
    for device_type in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="bad"):
            in_fresh_thread_on_cpu(lambda: int("bad"), device_type)

