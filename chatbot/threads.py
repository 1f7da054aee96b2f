"""Threads and cores: torch work in a thread of its own, which takes its OpenMP team with it
when it ends, and the cores a process may run on.

A thread that ran one parallel torch op keeps an idle OpenMP team until it exits, and once a
process holds more OpenMP threads than CPUs, libgomp makes every team's workers sleep between
parallel regions, which slows every decode step after (chatbot/sampling.py, "Threads"). Code
that runs torch work outside the server's sampler threads - timing kernels at load, the
benchmarks - runs it here.

How long idle workers spin is the other half. libgomp's default (GOMP_SPINCOUNT 300000
iterations, some milliseconds) keeps a decode step's next parallel region fast on quiet
cores, and costs ~10x where another busy process needs the core a worker spins on (a second
server on the same host, any CPU-bound job). `bound_spinning` sets a shorter spin before
torch loads, unless the environment already chose (OMP_WAIT_POLICY or GOMP_SPINCOUNT):
measured by `python -m bench neighbours` (docs/performance.md).

Left out: a pool; each call starts and joins one thread. OpenMP runtimes other than
libgomp (Intel's, LLVM's) read their own variables.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


SPIN_COUNT = 10000  # iterations an idle OpenMP worker spins before it sleeps


def bound_spinning(environ=os.environ) -> str | None:
    """Bound the OpenMP workers' spinning for this process and its children unless the
    environment already sets a wait policy; must run before torch is imported. Returns the
    spin count set, or None where the environment's own choice stands."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return None
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return environ["GOMP_SPINCOUNT"]


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


def all_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
