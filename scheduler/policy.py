"""Scheduling policies behind one small interface.

A policy answers three questions: how long a quantum is, where a request joins the
run queue, and which waiting request a free slot takes.  FIFO is round robin with an
infinite quantum, as in an OS.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from scheduler.request import Request


@dataclass(frozen=True)
class Quantum:
    tokens: int | None = None  # deterministic (tests); None = no token limit
    ms: float | None = None  # wall clock; None = no time limit

    @property
    def infinite(self) -> bool:
        return self.tokens is None and self.ms is None


class Policy:
    name = "base"

    def __init__(self, quantum: Quantum):
        self.quantum = quantum

    def quantum_for(self, req: Request) -> Quantum:
        return self.quantum

    def enqueue(self, ready: deque[Request], req: Request) -> None:
        """Put a new or preempted request in the run queue."""
        ready.append(req)

    def pick(self, ready: deque[Request], worker: str) -> Request | None:
        """The first waiting request that may run on ``worker``."""
        for req in ready:
            if req.worker in (None, worker):
                return req
        return None


class RoundRobin(Policy):
    name = "rr"


class Fifo(Policy):
    name = "fifo"

    def __init__(self, quantum: Quantum):
        super().__init__(Quantum())


POLICIES: dict[str, type[Policy]] = {"rr": RoundRobin, "fifo": Fifo}


def make_policy(name: str, quantum: Quantum) -> Policy:
    try:
        return POLICIES[name](quantum)
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None
