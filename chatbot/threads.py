"""Threads and cores: torch work in a thread of its own, which takes its OpenMP team with it
when it ends; the cores a process may run on; and a thread count that follows how busy
someone else keeps the CPU (`CpuShare`).

A thread that ran one parallel torch op keeps an idle OpenMP team until it exits, and once a
process holds more OpenMP threads than CPUs, libgomp makes every team's workers sleep between
parallel regions, which slows every decode step after (chatbot/sampling.py, "Threads"). Code
that runs torch work outside the server's sampler threads - timing kernels at load, the
benchmarks - runs it here.

`CpuShare` is the one rule behind two policies: the learner child's (learner/cores.py: its
share while the server works, every core while it is idle) and the server's (`host_share`:
every core on a quiet host, one thread while another process keeps the CPU busy). Both read
CPU times from Linux's /proc; where it cannot be read, the learner keeps its share and the
server keeps every core.

Why the server drops to one thread. libgomp's workers spin between a decode step's hundreds
of small parallel regions; that is what makes a lone server fast (71 ms per step on 2 cores
against 99 ms with sleeping workers), and what makes it collapse beside a process of the same
priority that wants the cores too: a spinning worker holds the core its partner needs, 8-10x
slower per step. A team of one has nobody to wait for: 1.2-1.3x beside such a neighbour
(`python -m bench neighbours`, docs/performance.md). The server's own learner child counts as
such a neighbour too, though it runs niced: a team of two beside a training learner waits at
every barrier for the worker whose core the learner holds for a time slice (a decode step
1.82x its idle time during a round on a 2-core Xeon), where one thread beside it is 1.37x and
leaves the learner a core of its own (it trains about twice as fast while the user chats;
`python -m bench latency`, docs/performance.md).

`in_fresh_thread_on_cpu` does that on a CPU only: on a GPU a thread per use keeps host memory,
so there the work stays in the caller's (long-lived) thread.

Left out: a pool for `in_fresh_thread` (each call starts and joins one thread); cgroup CPU
quotas (a container's share of the host is read as the host's).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def in_fresh_thread(work: Callable[[], T], name: str = "torch-work") -> T:
    """work() in a new thread, joined; its exception, if any, is raised here."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def in_fresh_thread_on_cpu(work: Callable[[], T], device_type: str,
                           name: str = "torch-work") -> T:
    """work() in a new thread where its torch work runs on a CPU (the thread takes its OpenMP
    team with it); in the caller's thread on a GPU, where each new thread that ran CUDA work
    kept host memory after it ended (chatbot/sampling.py, "Threads")."""
    if device_type == "cpu":
        return in_fresh_thread(work, name)
    return work()


def all_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (all its threads); None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def host_cpu_seconds() -> float | None:
    """CPU seconds every process of the host has run (user, nice, system, interrupts; not idle,
    I/O wait or time a hypervisor stole), from /proc/stat; None if unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[1:8])
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class CpuShare:
    """A thread count from how busy a neighbour keeps the CPU: `busy_threads` while it used
    more than `busy_cores` of a core on average between two looks, or did within the last
    `quiet_s` seconds; `idle_threads` otherwise. `neighbour_seconds()` is the neighbour's
    cumulative CPU seconds (None: unreadable, which gives `unreadable_threads`).

    Looks closer together than `min_interval_s` reuse the last answer, so `apply` may be
    called at every decode step. `apply` sets the count for the calling thread: torch keeps
    an OpenMP thread count per thread, so every thread that runs torch work calls it.

    A look judges the average since the one before, so the first look after a pause judges
    the pause: a server's first step after a learner's 20 s round took one thread, though
    the round had ended seconds before. `watch` keeps looking in a thread of its own, every
    `min_interval_s`, so that a look is never older than that."""

    def __init__(self, busy_threads: int, idle_threads: int,
                 neighbour_seconds: Callable[[], float | None], *, busy_cores: float,
                 quiet_s: float, min_interval_s: float = 0.0,
                 unreadable_threads: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.busy_threads = busy_threads
        self.idle_threads = max(busy_threads, idle_threads)
        self.neighbour_seconds = neighbour_seconds
        self.busy_cores = busy_cores
        self.quiet_s = quiet_s
        self.min_interval_s = min_interval_s
        self.unreadable_threads = unreadable_threads or busy_threads
        self.clock = clock
        self._last = (clock(), neighbour_seconds())
        self._busy_at = -math.inf
        self._answer = self.idle_threads if self._last[1] is not None else \
            self.unreadable_threads
        self._applied = threading.local()
        self._lock = threading.Lock()

    def threads(self) -> int:
        """The thread count to use now."""
        with self._lock:
            now = self.clock()
            then, seconds_then = self._last
            if now - then < self.min_interval_s:
                return self._answer
            seconds = self.neighbour_seconds()
            self._last = (now, seconds)
            if seconds is None or seconds_then is None:
                self._answer = self.unreadable_threads
                return self._answer
            cores = (seconds - seconds_then) / (now - then) if now > then else 0.0
            if cores > self.busy_cores:
                self._busy_at = now
            answer = (self.busy_threads if now - self._busy_at < self.quiet_s
                      else self.idle_threads)
            if answer != self._answer:
                log.info("torch threads %d -> %d (the neighbour used %.2f cores over %.1f s)",
                         self._answer, answer, cores, now - then)
            self._answer = answer
            return answer

    def watch(self, stop: threading.Event | None = None) -> threading.Thread:
        """Look every `min_interval_s` (at least every 0.1 s) in a daemon thread, until `stop`
        is set."""
        stop = stop or threading.Event()

        def look() -> None:
            while not stop.wait(max(self.min_interval_s, 0.1)):
                self.threads()

        thread = threading.Thread(target=look, name="cpu-share-watch", daemon=True)
        thread.start()
        return thread

    def apply(self) -> None:
        """Set torch's thread count for what follows in this thread."""
        import torch

        threads = self.threads()
        if getattr(self._applied, "threads", None) != threads:
            torch.set_num_threads(threads)
            self._applied.threads = threads


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread while the block runs, then on the count it had. The count is the
    process's, not the thread's: a thread that starts torch work later starts with the last
    count set anywhere, so a count left at 1 would slow every later thread's work."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def host_share(every_core: int, own_pids: Callable[[], list[int]], *,
               clock: Callable[[], float] = time.monotonic,
               host_seconds: Callable[[], float | None] = host_cpu_seconds,
               process_seconds: Callable[[int], float | None] = process_cpu_seconds
               ) -> CpuShare:
    """The server's thread count: `every_core` threads while the rest of the host is quiet,
    one while the host's other processes - everything but the processes `own_pids()` names,
    the server first - kept more than half a core busy within the last two seconds. Looked
    at no more than twice a second. A process named in `own_pids()` that has gone leaves its
    CPU seconds in the host's count: one false alarm, two seconds on one thread."""

    def others() -> float | None:
        host = host_seconds()
        own = [process_seconds(pid) for pid in own_pids()]
        if host is None or own[0] is None:  # the server itself must be readable
            return None
        return host - sum(s for s in own if s is not None)

    return CpuShare(1, every_core, others, busy_cores=0.5, quiet_s=2.0, min_interval_s=0.5,
                    unreadable_threads=every_core, clock=clock)
