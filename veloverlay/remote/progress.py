"""Progress of a transfer: bytes, items, rate and ETA, reported to a callback from any thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from veloverlay.records import Record

__all__ = ["Transfer", "ProgressFn", "Meter"]


class Transfer(Record):
    phase: str  # "push" or "pull"
    done: int  # bytes
    total: int
    items_done: int
    items_total: int
    elapsed: float

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far (None before anything moved)."""
        if self.done <= 0 or self.total <= self.done:
            return None if self.done <= 0 else 0.0
        return (self.total - self.done) / self.rate


ProgressFn = Callable[[Transfer], None]


class Meter:
    """Thread-safe counters; calls `fn` at most every `interval` seconds, and at `finish()`."""

    def __init__(
        self, phase: str, total: int, items: int, fn: ProgressFn | None, interval: float = 0.1
    ) -> None:
        self.phase = phase
        self.total = total
        self.items_total = items
        self.fn = fn
        self.interval = interval
        self.done = 0
        self.items_done = 0
        self._t0 = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()

    def add(self, nbytes: int, items: int = 0) -> None:
        with self._lock:
            self.done += nbytes
            self.items_done += items
            now = time.monotonic()
            if self.fn is None or now - self._last < self.interval:
                return
            self._last = now
            self.fn(self._snapshot(now))

    def _snapshot(self, now: float) -> Transfer:
        return Transfer(
            self.phase, self.done, self.total, self.items_done, self.items_total, now - self._t0
        )

    def finish(self) -> Transfer:
        with self._lock:
            t = self._snapshot(time.monotonic())
            if self.fn is not None:
                self.fn(t)
            return t
