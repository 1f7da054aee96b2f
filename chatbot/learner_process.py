"""Start the learner as a child process of the server and report how it is doing.

The child is `python -m learner` with the same data folder and the model and learner flags of
the server's Config, at a lower scheduling priority (`--learner-nice`; or in Linux's idle
scheduling class, `--learner-sched idle`: it runs on the CPU time the server and everything
else leave) and, while the server works, with fewer torch threads (`--learner-threads`,
default half the cores; while the server is idle `--learner-idle-threads`, default every
core: learner/cores.py): chat first, learning second, when they share a CPU. Its output goes
to `data/learner.log`. The server never waits on it: if it dies, chat goes on and `state()`
says so, with the exit code and the last error the learner wrote to the DB.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from chatbot.config import Config, learner_argv
from chatbot.states import LearnerState
from chatbot.store import Store
from chatbot.threads import all_cores

log = logging.getLogger(__name__)

HEARTBEAT_STALE_S = 120.0
PR_SET_PDEATHSIG = 1


def _child_setup(nice: int, sched: str = "normal") -> None:
    """In the child, before exec: chat first, learning second, when they share the CPU - a
    lower priority than the server's (`nice`) and, with `sched` "idle", the idle scheduling
    class - and ask Linux to send SIGTERM when the server dies, so a killed server never
    leaves an orphan learner holding the learner lock.

    The trade (`python -m bench latency` and the API suites rerun-instant-64-wide and its
    -normal, 2-core Xeon; docs/performance.md): a niced learner still takes time slices while
    the server samples - 1.82x idle per decode step during a round while the server sampled on
    every core, 1.37x since it takes one thread while the learner trains (app.py
    `server_share`), against 1.03x in the idle class - but in the idle class a user who votes
    the moment each pair appears leaves it nothing until they stop, and what it learned for
    them suffered (the share's gain +0.13 against +0.20)."""
    if nice > 0:
        os.nice(nice)
    if sched == "idle" and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # not allowed here (a seccomp profile): the nice level alone
            pass
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the child may outlive a killed server
        pass


class LearnerProcess:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.process: subprocess.Popen | None = None
        self.log_path = Path(config.data_dir) / "learner.log"

    def threads(self) -> int:
        """--learner-threads, or half the cores this process may run on (chatbot/threads.py
        `all_cores`: a container's CPU affinity, not the machine's cores)."""
        return self.config.learner_threads or max(1, all_cores() // 2)

    def argv(self) -> list[str]:
        """The child's command line: the learner flags, its threads, and this process to
        share the CPU with (learner/cores.py)."""
        return [sys.executable, "-m", "learner", *learner_argv(self.config),
                "--threads", str(self.threads()),  # the last --threads wins
                "--share-cpu-with", str(os.getpid()),
                *(["--idle-threads", str(self.config.learner_idle_threads)]
                  if self.config.learner_idle_threads else [])]

    def start(self) -> None:
        argv = self.argv()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL,
                                            cwd=Path(__file__).resolve().parent.parent,
                                            preexec_fn=lambda: _child_setup(
                                                self.config.learner_nice,
                                                self.config.learner_sched))
        log.info("learner started (pid %d), log in %s", self.process.pid, self.log_path)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def state(self) -> dict:
        """starting / idle / preparing / training / stopped, with pid, exit code and last error."""
        if self.process is None:
            return learner_state(self.store)
        state = learner_state(self.store, heartbeat_stale_s=None)
        code = self.process.poll()
        state["pid"] = self.process.pid
        if code is not None:
            state.update(state=LearnerState.STOPPED, exit_code=code)
        return state


def learner_state(store: Store, heartbeat_stale_s: float | None = HEARTBEAT_STALE_S) -> dict:
    """What the learner wrote to the database: its state, pid, last error and heartbeat.
    A front-end without a learner child (--no-learner: the learner runs elsewhere) reports
    this; a heartbeat older than `heartbeat_stale_s` means the learner is gone."""
    row = store.learner_status()
    if row is None:
        return {"state": "not started"}
    state = {"state": row["state"], "pid": row["pid"], "last_error": row["last_error"],
             "heartbeat_at": row["heartbeat_at"]}
    if heartbeat_stale_s is not None and row["heartbeat_at"]:
        age = (datetime.now(UTC) - datetime.fromisoformat(row["heartbeat_at"])).total_seconds()
        if age > heartbeat_stale_s:
            state["state"] = LearnerState.STOPPED
    return state
