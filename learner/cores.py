"""How many torch threads the learner child trains with: every core while the server beside it
is idle, its share (`--learner-threads`, default half the cores) while the server works.

The server starts the learner at a lower priority on the same CPU, with `--share-cpu-with`
its own pid. Before each micro batch (and at each idle poll) the learner reads the server's
CPU time (Linux: /proc/<pid>/stat); if the server used more than `BUSY_CORES` of a core since
the last look, or did within the last `QUIET_S` seconds, the learner keeps to its share, else
it takes every core (`--learner-idle-threads`; the same as --learner-threads: a fixed count).
A fixed share leaves cores idle while nobody chats; every core all the time slows the chat
more. Measured with `python -m bench latency` (docs/performance.md). The rule itself is
chatbot/threads.py's `CpuShare`, which the server uses too, towards the rest of the host.

Left out: other processes on the machine (the learner's lower priority keeps it behind them),
platforms without /proc (the share stays fixed), a learner started on its own (no
--share-cpu-with: torch's own thread count or --threads, fixed).
"""

from __future__ import annotations

from chatbot.threads import CpuShare, all_cores, process_cpu_seconds

BUSY_CORES = 0.25  # the server's average core use above which it counts as busy
QUIET_S = 2.0  # how long the server must stay below it before the learner takes every core


def learner_share(server_pid: int, busy_threads: int, idle_threads: int | None = None
                  ) -> CpuShare:
    """The learner's share beside the server `server_pid`: `busy_threads` while it works,
    `idle_threads` (default every core) while it is idle, `busy_threads` if it cannot be read."""
    return CpuShare(busy_threads, idle_threads or all_cores(),
                    lambda: process_cpu_seconds(server_pid),
                    busy_cores=BUSY_CORES, quiet_s=QUIET_S)
