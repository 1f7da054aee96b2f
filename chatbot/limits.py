"""Per-user limits against one user steering the model: a capped share of every training
batch, and a rate limit on votes; and `Slots`, a bound on replies generated at once.

`fair_pick` takes items round-robin across users, oldest first within each user, then trims
the batch until no user holds more than `max_share` of it (one item each is always allowed).
A user who casts most of the votes therefore never fills a batch on their own, even when
nobody else has voted lately; their surplus stays pending for later rounds, so nothing they
did is lost. Callers pass max_share=1 when only one user has ever given feedback (a
single-user setup), where the cap would protect nobody and only slow learning down.

Left out: reputation or agreement-based weighting of users.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Hashable, Iterator, Sequence

from chatbot.errors import TooBusy


def fair_pick(items: Sequence, user_of: Callable[[object], Hashable], limit: int,
              max_share: float = 1.0) -> list:
    """Up to `limit` items, round-robin over users, then trimmed so that no user holds more
    than `max_share` of the batch (or one item). Items keep their order within a user."""
    queues: dict[Hashable, deque] = defaultdict(deque)
    for item in items:
        queues[user_of(item)].append(item)
    picked: list = []
    while len(picked) < limit and any(queues.values()):
        for queue in queues.values():
            if queue and len(picked) < limit:
                picked.append(queue.popleft())
    while True:
        counts = Counter(user_of(item) for item in picked)
        cap = max(1, math.floor(max_share * len(picked)))
        over = [user for user, n in counts.items() if n > cap]
        if not over:
            return picked
        last = max(i for i, item in enumerate(picked) if user_of(item) == over[0])
        del picked[last]


class RateLimiter:
    """At most `limit` events per user in any `window_s` seconds (sliding window)."""

    def __init__(self, limit: int, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._events: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def check(self, user: str, what: str = "votes") -> None:
        """Count one event for `user`, or raise TooBusy saying when to try again."""
        if self.limit <= 0:
            return
        with self._lock:
            now = self.clock()
            events = self._events[user]
            while events and now - events[0] >= self.window_s:
                events.popleft()
            if len(events) >= self.limit:
                wait = math.ceil(self.window_s - (now - events[0]))
                raise TooBusy(f"too many {what}: at most {self.limit} per "
                              f"{self.window_s:g} s; try again in {wait} s")
            events.append(now)


class Slots:
    """At most `size` holders at once and at most `waiting` more queued for a turn; one more
    is refused at once with TooBusy (Gradio's queue does this for the page; the
    OpenAI-compatible routes use this)."""

    def __init__(self, size: int, waiting: int) -> None:
        self._free = threading.Semaphore(size)
        self._waiting = waiting
        self._queued = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def taken(self) -> Iterator[None]:
        if not self._free.acquire(blocking=False):
            with self._lock:
                if self._queued >= self._waiting:
                    raise TooBusy("the queue is full; try again shortly")
                self._queued += 1
            try:
                self._free.acquire()
            finally:
                with self._lock:
                    self._queued -= 1
        try:
            yield
        finally:
            self._free.release()
