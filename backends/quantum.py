"""Quantum accounting, one small class for every engine: how much of its quantum a request used.

A quantum (``ipc.messages.Quantum``) is tokens and/or milliseconds; whichever is reached first
ends it, and neither means no limit (FIFO).  Tokens are those the request generated in this
quantum (``count``; a prefill does not count).  Time is what the request was charged: a local
engine ``charge`` s each row its share of a batched step (1/B of the step's time, and a prefill
to the prompts it ran), as an OS charges a time slice in CPU time used, so a full batch does not
shrink the quantum B-fold; an engine with one stream per slot (the API engine) counts wall time
since the quantum began instead (``wall=True``).

``ended`` marks a quantum whose end was told to the daemon (``QuantumEnd``) and not yet answered
(``start`` of the next quantum clears it).  A token quantum then stops the request until the
daemon's word (``paused``): exact, repeatable preemption points.  A time quantum is not exact
anyway, so a local engine's row decodes on while the daemon decides; ``nearly_over`` lets such a
quantum end up to ``ROUNDING`` early, together with another row's (see ``backends.local``).

Usage (any engine)::

    meter = QuantumMeter(run.quantum)           # on ``Run``; ``meter.start(cont.quantum)`` on ``Continue``
    meter.count(); meter.charge(seconds)        # after each token
    if not meter.ended and meter.over():
        meter.end(); send(M.QuantumEnd(...))
"""

from __future__ import annotations

import time

from ipc.messages import Quantum

ROUNDING = 0.25  # the share of a time quantum a row may give up to end it with others
NO_LIMIT = Quantum()


class QuantumMeter:
    """One request's use of its current quantum."""

    __slots__ = ("quantum", "wall", "tokens", "charged_s", "started", "ended")

    def __init__(self, quantum: Quantum = NO_LIMIT, *, wall: bool = False):
        self.wall = wall  # time is wall-clock since ``start``, not what ``charge`` added up
        self.start(quantum)

    def start(self, quantum: Quantum) -> None:
        """A new quantum: nothing used yet."""
        self.quantum = quantum
        self.tokens = 0
        self.charged_s = 0.0
        self.started = time.monotonic()
        self.ended = False

    def count(self, n: int = 1) -> None:
        """``n`` more tokens generated in this quantum."""
        self.tokens += n

    def charge(self, seconds: float) -> None:
        """Compute time used by the request (its share of a batched step)."""
        self.charged_s += seconds

    @property
    def spent_s(self) -> float:
        return time.monotonic() - self.started if self.wall else self.charged_s

    @property
    def exact(self) -> bool:
        """A token quantum: it ends on an exact, repeatable token."""
        return self.quantum.tokens is not None

    @property
    def paused(self) -> bool:
        """A token quantum that ended: the request waits for the daemon's word."""
        return self.ended and self.exact

    def over(self) -> bool:
        q = self.quantum
        if q.tokens is not None and self.tokens >= q.tokens:
            return True
        return q.ms is not None and self.spent_s * 1000.0 >= q.ms

    def nearly_over(self) -> bool:
        """A time quantum (only) with at most ``ROUNDING`` of it left: it may end with another's."""
        q = self.quantum
        if q.tokens is not None or q.ms is None:
            return False
        return self.spent_s * 1000.0 >= (1.0 - ROUNDING) * q.ms

    def end(self) -> None:
        """The daemon was told this quantum is over."""
        self.ended = True
