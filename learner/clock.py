"""Where a round's time goes: named phases (`reference`, `train`, `kl_check`...), and the
micro batches it ran, counted by the torch threads each ran on. Both go into the round's
metrics and log line. Every pass of the learner over replies goes through `micro_batches`,
which first calls `pace`: the CPU share of learner/cores.py sets the threads there.

Left out: a profiler's view inside a phase (`python -m bench learner-round` has one).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch


def chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class RoundClock:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pace: Callable[[], None] = lambda: None  # before every micro batch
        self.seconds: dict[str, float] = {}
        self.micro_batches_by_threads: dict[int, int] = {}
        self._open: list | None = None  # [name, since] of the phase being timed

    def reset(self) -> None:
        """A new round: nothing timed yet."""
        self.seconds, self.micro_batches_by_threads = {}, {}

    def micro_batches(self, items: list, size: int) -> Iterator[list]:
        """`chunks`, with a call to `pace` before each: the learner's CPU share may change."""
        for micro in chunks(items, size):
            self.pace()
            threads = torch.get_num_threads()
            self.micro_batches_by_threads[threads] = \
                self.micro_batches_by_threads.get(threads, 0) + 1
            yield micro

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the block's seconds to `seconds[name]`; a phase inside another one counts for
        itself only (the preview inside training)."""
        outer = self._open
        if outer is not None:
            self._add_time(outer)
        self._open = [name, time.perf_counter()]
        try:
            yield
        finally:
            self._add_time(self._open)
            self._open = outer
            if outer is not None:  # the outer phase goes on from here
                outer[1] = time.perf_counter()

    def _add_time(self, phase: list) -> None:
        """Add the time since `phase` = [name, since] to its name, and restart it from now."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase[0]] = self.seconds.get(phase[0], 0.0) + now - phase[1]
        phase[1] = now
