"""Shortest remaining processing time first, by the tokens a request may still generate.

MLFQ and PLAS guess a job's length from the service it has received; a request's
``max_tokens`` states an upper bound outright.  When many requests share too few slots,
running the one with the fewest tokens left first minimises the mean completion time (SRPT
is optimal for it on one server), and a short request that arrives behind long ones takes a
slot at the next quantum end instead of waiting for them to finish, as in llama-server's
first-come slots.  A request without ``max_tokens`` counts as ``default_tokens`` long.

Long requests wait while shorter ones keep arriving; ``aging`` (tokens per second waited)
lowers a waiting request's rank so that none waits forever.
"""

from __future__ import annotations

import time
from typing import Any

from scheduler.policy import Policy, Quantum, nice_weight
from scheduler.request import Request, State


class ShortestRemaining(Policy):
    """Options: ``default_tokens`` (the length of a request without ``max_tokens``), ``aging``
    (tokens of rank a waiting request gains per second it waits; 0 = none)."""

    name = "srpt"

    def __init__(self, quantum: Quantum, default_tokens: int = 4096, aging: float = 1.0, **opts: Any):
        super().__init__(quantum, **opts)
        if default_tokens < 1 or aging < 0:
            raise ValueError("srpt needs default_tokens >= 1 and aging >= 0")
        self.default_tokens, self.aging = default_tokens, float(aging)

    def remaining(self, req: Request) -> int:
        """Tokens the request may still generate."""
        return max((req.max_tokens or self.default_tokens) - req.generated, 0)

    def priority(self, req: Request) -> tuple:
        waited = time.monotonic() - req.since if req.state is State.READY else 0.0  # since it joined the queue
        rank = self.remaining(req) / nice_weight(req.nice) - self.aging * waited
        return (rank,)

    def may_preempt(self, running: Request, waiting: Request) -> bool:
        """Only a strictly shorter request takes the slot (equal ones would take turns for nothing)."""
        return self.priority(waiting) < self.priority(running)

    def info(self, req: Request) -> dict[str, Any]:
        rank = self.priority(req)[0]
        return super().info(req) | {"priority": round(rank, 3), "remaining": self.remaining(req)}
