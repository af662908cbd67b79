"""Daemon-wide counters since start: what ``stats``, ``quantad top`` and the Prometheus metrics read.

Kept apart from the request table because finished requests leave the table at once; these
totals are all that remains of them.  Plain integers, updated from the scheduler's own loop,
so a reader on that loop (the ``stats`` op, a metrics scrape) sees a consistent view.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

RATE_WINDOW_S = 10.0  # tokens/s is measured over about this much recent time


@dataclass
class Counters:
    accepted: int = 0
    tokens: int = 0  # tokens streamed to agents, all requests
    preemptions: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {"DONE": 0, "FAILED": 0, "CANCELLED": 0})
    started_at: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    _samples: deque[tuple[float, int]] = field(default_factory=deque)

    def finish(self, state: str) -> None:
        self.finished[state] = self.finished.get(state, 0) + 1

    def sample(self, now: float | None = None) -> None:
        """Record the token total (called about once a second); old samples fall out of the window."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, self.tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()

    def tokens_per_s(self, now: float | None = None) -> float:
        """Tokens streamed per second over the last ~10 s (since start while younger)."""
        now = time.monotonic() if now is None else now
        t0, n0 = self._samples[0] if self._samples else (self.started_at, 0)
        return (self.tokens - n0) / (now - t0) if now > t0 else 0.0

    def as_dict(self) -> dict:
        return {
            "accepted": self.accepted,
            "tokens": self.tokens,
            "preemptions": self.preemptions,
            "finished": dict(self.finished),
        }
