"""Threads and cores: torch work in a thread of its own, which takes its OpenMP team with it
when it ends, and the cores a process may run on.

A thread that ran one parallel torch op keeps an idle OpenMP team until it exits, and once a
process holds more OpenMP threads than CPUs, libgomp makes every team's workers sleep between
parallel regions, which slows every decode step after (chatbot/sampling.py, "Threads"). Code
that runs torch work outside the server's sampler threads - timing kernels at load, the
benchmarks - runs it here.

Left out: a pool; each call starts and joins one thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

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


def all_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
