"""How many torch threads the learner child trains with: every core while the host is quiet,
its share (`--learner-threads`, default half the cores) while the server beside it - or any
other process on the host - works.

The server starts the learner at a lower priority (or in the idle scheduling class: its
`--learner-sched`) on the same CPU, with `--share-cpu-with` its own pid. Before each micro
batch (and at each idle poll) the learner reads the CPU time of every process but itself
(Linux: /proc/stat less /proc/self/stat; the server's own /proc/<pid>/stat where the host
cannot be read); if they used more than `BUSY_CORES` of a core since the last look, or did
within the last `QUIET_S` seconds, the learner keeps to its share, else it takes every core
(`--learner-idle-threads`; the same as --learner-threads: a fixed count). A fixed share leaves
cores idle while nobody chats; every core all the time slows the chat more. Measured with
`python -m bench latency` (docs/performance.md). Other processes count as well as the server
because every core's spinning OpenMP workers collapse beside any busy process of the same or
a higher priority, and the learner's is lower than everyone's (chatbot/threads.py,
chatbot/learner_process.py). The rule itself is chatbot/threads.py's `CpuShare`, which the
server uses too, towards the rest of the host.

Left out: platforms without /proc (the share stays fixed), a learner started on its own (no
--share-cpu-with: torch's own thread count or --threads, fixed).
"""

from __future__ import annotations

import os

from chatbot.threads import CpuShare, all_cores, host_cpu_seconds, process_cpu_seconds

BUSY_CORES = 0.25  # the others' average core use above which they count as busy
QUIET_S = 2.0  # how long they must stay below it before the learner takes every core


def learner_share(server_pid: int, busy_threads: int, idle_threads: int | None = None
                  ) -> CpuShare:
    """The learner's share beside the server `server_pid`: `busy_threads` while the server or
    another process works, `idle_threads` (default every core) while all are idle,
    `busy_threads` if nothing can be read."""
    own = os.getpid()

    def others() -> float | None:
        host, mine = host_cpu_seconds(), process_cpu_seconds(own)
        if host is None or mine is None:
            return process_cpu_seconds(server_pid)
        return host - mine

    return CpuShare(busy_threads, idle_threads or all_cores(), others,
                    busy_cores=BUSY_CORES, quiet_s=QUIET_S)
