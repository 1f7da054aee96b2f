"""Per-user limits against one user steering the model: a capped share of every training
batch, and a rate limit on votes.

`fair_pick` takes items round-robin across users, oldest first within each user, and stops
taking from a user once they hold `max_share` of the batch (at least one item each). A user
who casts most of the votes therefore cannot fill a batch on their own while others wait;
their surplus stays pending for later rounds, so nothing they did is lost. When only one user
has anything to give (a single-user setup), the cap protects nobody and is not applied.

Left out: reputation or agreement-based weighting of users.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Hashable, Sequence

from chatbot.errors import Conflict


def fair_pick(items: Sequence, user_of: Callable[[object], Hashable], limit: int,
              max_share: float = 1.0) -> list:
    """Up to `limit` items, round-robin over users, no user above `max_share` of `limit`
    (unless they are the only user with items)."""
    queues: dict[Hashable, deque] = defaultdict(deque)
    for item in items:
        queues[user_of(item)].append(item)
    per_user_cap = max(1, math.floor(max_share * limit)) if len(queues) > 1 else limit
    picked, taken = [], defaultdict(int)
    while len(picked) < limit:
        progressed = False
        for user, queue in queues.items():
            if queue and taken[user] < per_user_cap and len(picked) < limit:
                picked.append(queue.popleft())
                taken[user] += 1
                progressed = True
        if not progressed:
            break
    return picked


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
        """Count one event for `user`, or raise Conflict saying when to try again."""
        if self.limit <= 0:
            return
        with self._lock:
            now = self.clock()
            events = self._events[user]
            while events and now - events[0] >= self.window_s:
                events.popleft()
            if len(events) >= self.limit:
                wait = math.ceil(self.window_s - (now - events[0]))
                raise Conflict(f"too many {what}: at most {self.limit} per "
                               f"{self.window_s:g} s; try again in {wait} s")
            events.append(now)
