"""The learner's schedule: poll the pending feedback, run a round when enough waits, prepare
the next round while it does not, keep the heartbeat the server reads, and ride out a
database that went away. What a round does is learner/rounds.py's.

* A round starts once `learn_every` new items are pending, or fewer once nothing new has come
  for `learn_after_seconds` (the person paused or left: their last votes are learnt too).
* Until then the learner `prepare`s the next round: when the last one has ended, and as each
  item comes in (learner/head_start.py).
* A failed round releases its claims (rounds.run_round) and the next try waits longer,
  up to a minute; the loop itself never ends on one.
* While the database cannot be reached (a PostgreSQL restart) the loop waits and tries again,
  backing off up to 30 s; then it takes its learner lock again and goes on, or stops with
  LearnerLockLost if another learner took the lock meanwhile.

Left out: waking on a notification instead of polling (a poll is one small query).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from chatbot import heap
from chatbot.errors import DuetError
from chatbot.states import LearnerState

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0  # how often the status row is refreshed while nothing changes


class LearnerLockLost(DuetError):
    """Another learner took the database's learner lock (after a PostgreSQL restart)."""


class LearnerLoop:
    def __init__(self, learner) -> None:
        self.learner = learner  # a learner.worker.Learner
        self.store = learner.store
        self.config = learner.config
        self.pid = os.getpid()
        self.round_failures = 0  # rounds in a row that failed
        self.unreachable = 0  # polls in a row the database did not answer
        self.last_beat = 0.0  # when the status row was last written
        self.prepared_for: int | None = None  # the pending count `prepare` last ran at
        self.pending_seen = 0  # the pending count, and since when it has not changed
        self.pending_since = time.monotonic()
        self.started = False
        learner.on_step = self._beat_while_training

    def run(self, stop: threading.Event | None = None) -> None:
        while stop is None or not stop.is_set():
            try:
                if not self.store.keep_learner_lock():
                    raise LearnerLockLost("another learner took this database's learner "
                                          "lock while the database was unreachable")
                if not self.started:
                    self._status(LearnerState.IDLE)
                    self.started = True
                self.poll()
                self.unreachable = 0
            except LearnerLockLost:
                raise
            except Exception:  # noqa: BLE001 - the database went away: wait for it
                self.unreachable += 1
                log.exception("the database did not answer (%d in a row); trying again",
                              self.unreachable)
                time.sleep(min(30.0, 0.5 * 2.0 ** self.unreachable))

    def poll(self) -> None:
        """One look at the pending feedback: a round, or else the next round prepared."""
        pending = self.learner.pending()
        if pending != self.pending_seen:
            self.pending_seen, self.pending_since = pending, time.monotonic()
        quiet = time.monotonic() - self.pending_since >= self.config.learn_after_seconds
        if pending >= self.config.learn_every or (pending and quiet):
            self._round()
            return
        if pending != self.prepared_for:  # a round ended or an item came in: the next one
            self.prepared_for = pending
            self._status(LearnerState.PREPARING)
            try:
                self.learner.prepare()
            except Exception:  # noqa: BLE001 - the round computes whatever is missing
                log.exception("could not prepare the next round")
            heap.release()
            self._status(LearnerState.IDLE)
        if time.monotonic() - self.last_beat > HEARTBEAT_SECONDS:
            self._status(LearnerState.IDLE)
        self.learner.clock.pace()  # keeps the CPU share's view of the server fresh between rounds
        time.sleep(self.config.learner_poll_seconds)

    def _round(self) -> None:
        self._status(LearnerState.TRAINING)
        try:
            # This process is the database's one learner (learner lock) and between rounds it
            # holds no claim: any claim left is a failed round's whose release failed too (the
            # database was gone): give it back now; the same for its preview, if still live.
            self.store.release_claims()
            self.store.withdraw_unfinished_preview()
            self.learner.round()
            self.round_failures = 0
            self.prepared_for = None  # the next round starts from here
            self._status(LearnerState.IDLE)
        except Exception as exc:  # noqa: BLE001 - one bad round must not end learning
            self.round_failures += 1
            log.exception("round failed")
            self._status(LearnerState.IDLE, last_error=str(exc)[:500])
            time.sleep(min(60.0, 2.0 ** self.round_failures))
        finally:
            heap.release()  # a round's batches are gone: their pages go back (chatbot/heap.py)

    def _status(self, state: LearnerState, last_error: str | None = None) -> None:
        self.store.set_learner_status(self.pid, state, last_error=last_error)
        self.last_beat = time.monotonic()

    def _beat_while_training(self) -> None:
        """After each optimizer step: a long round must not look like a dead learner."""
        if time.monotonic() - self.last_beat > HEARTBEAT_SECONDS:
            self._status(LearnerState.TRAINING)
