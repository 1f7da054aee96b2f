"""How many torch threads the learner child trains with: every core while the server beside it
is idle, its share (`--learner-threads`, default half the cores) while the server works.

The server starts the learner at a lower priority on the same CPU, with `--share-cpu-with`
its own pid. Before each micro batch (and at each idle poll) the learner reads the server's
CPU time (Linux: /proc/<pid>/stat); if the server used more than `BUSY_CORES` of a core since
the last look, or did within the last `QUIET_S` seconds, the learner keeps to its share, else
it takes every core (`--learner-idle-threads`; the same as --learner-threads: a fixed count).
A fixed share leaves cores idle while nobody chats; every core all the time slows the chat
more. Measured with `python -m bench latency` (docs/performance.md).

Left out: other processes on the machine (the learner's lower priority keeps it behind them),
platforms without /proc (the share stays fixed), a learner started on its own (no
--share-cpu-with: torch's own thread count or --threads, fixed).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

from chatbot.threads import all_cores

BUSY_CORES = 0.25  # the server's average core use above which it counts as busy
QUIET_S = 2.0  # how long the server must stay below it before the learner takes every core


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (all its threads); None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class CpuShare:
    """Decides the learner's thread count from how busy the server has been."""

    def __init__(self, server_pid: int, busy_threads: int, idle_threads: int | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 cpu_seconds: Callable[[int], float | None] = process_cpu_seconds) -> None:
        self.server_pid = server_pid
        self.busy_threads = busy_threads
        self.idle_threads = max(busy_threads, idle_threads or all_cores())
        self.clock = clock
        self.cpu_seconds = cpu_seconds
        self._last = (clock(), cpu_seconds(server_pid))
        self._busy_at = -math.inf

    def threads(self) -> int:
        """The thread count to use now."""
        now, cpu = self.clock(), self.cpu_seconds(self.server_pid)
        then, cpu_then = self._last
        self._last = (now, cpu)
        if cpu is None or cpu_then is None:  # no /proc, or the server is gone: keep the share
            return self.busy_threads
        if now > then and (cpu - cpu_then) / (now - then) > BUSY_CORES:
            self._busy_at = now
        return self.busy_threads if now - self._busy_at < QUIET_S else self.idle_threads

    def apply(self) -> None:
        """Set torch's thread count for what follows in this thread."""
        import torch

        threads = self.threads()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
