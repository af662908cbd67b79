"""Scheduling policies behind one small interface.

A policy answers: how long a quantum is, where a request joins the run queue, which
waiting request a free slot takes, and whether a waiting request may take the slot of
one whose quantum just ended.  It also hears about service (tokens) as it is given, so
policies that rank by service received (fair, plas) can keep their counters.  FIFO is
round robin with an infinite quantum, as in an OS.  See docs/policies.md.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ipc.messages import Quantum  # the wire's record, also ``scheduler.policy.Quantum``
from scheduler.request import Request


def nice_weight(nice: int) -> float:
    """Share weight of a nice value, as in Linux CFS: nice 0 weighs 1, each step is a factor 1.25."""
    return 1.25 ** (-nice)


def share_keys(req: Request) -> tuple[str, str]:
    """What service is shared between: its identity (level 0), and its program within that identity (level 1)."""
    return f"owner:{req.owner}", f"program:{req.program_key}"


def join_backlog(live: dict[str, int], key: str) -> None:
    """One more request of ``key`` waiting or running."""
    live[key] = live.get(key, 0) + 1


def leave_backlog(live: dict[str, int], key: str) -> bool:
    """One request of ``key`` fewer; True when none is left (the key leaves the backlog and ``live``)."""
    left = live.get(key, 0) - 1
    if left > 0:
        live[key] = left
        return False
    live.pop(key, None)
    return True


class Policy:
    """Round robin by default; ``priority`` orders waiting requests (lower runs first).

    Options (``quantad serve --policy-opt KEY=VALUE``) are the keyword arguments of a
    policy's constructor; every policy takes ``input_weight`` and ``output_weight``, the
    service charged per prompt token and per generated token.
    """

    name = "base"

    def __init__(self, quantum: Quantum, input_weight: float = 1.0, output_weight: float = 2.0):
        if input_weight < 0 or output_weight < 0:
            raise ValueError("input_weight and output_weight must be >= 0")
        self.quantum = quantum
        self.input_weight = float(input_weight)
        self.output_weight = float(output_weight)

    # ---- the interface the scheduler calls ------------------------------------------------
    def quantum_for(self, req: Request) -> Quantum:
        return self.quantum

    def admit(self, req: Request) -> None:
        """A new request enters the system (before its first ``enqueue``)."""

    def enqueue(self, ready: deque[Request], req: Request) -> None:
        """Put a new or preempted request in the run queue (the tail: round robin within a priority)."""
        ready.append(req)

    def pick(self, ready: deque[Request], worker: str) -> Request | None:
        """The waiting request of best ``priority`` that may run on ``worker``; ties go by queue order."""
        best: Request | None = None
        best_key: tuple | None = None
        for req in ready:
            if req.worker in (None, worker):
                key = self.priority(req)
                if best_key is None or key < best_key:
                    best, best_key = req, key
        return best

    def may_preempt(self, running: Request, waiting: Request) -> bool:
        """At ``running``'s quantum end: may ``waiting`` take its slot?  Yes when its priority is at least as high."""
        return self.priority(waiting) <= self.priority(running)

    def charge(self, req: Request) -> None:
        """Account the service ``req`` received since the last charge."""
        delta = req.take_service(self.service(req))
        if delta:
            self.account(req, delta)

    def quantum_used(self, req: Request) -> None:
        """``req`` used up a whole quantum (it may or may not be preempted now)."""

    def release(self, req: Request) -> None:
        """``req`` left the system (done, failed, cancelled)."""

    def info(self, req: Request) -> dict[str, Any]:
        """What ``ps`` and the final stats show of this policy's view of ``req``."""
        return {"priority": req.nice, "level": None, "service": round(req.charged, 3)}

    # ---- hooks for subclasses ---------------------------------------------------------------
    def priority(self, req: Request) -> tuple:
        """Lower runs first.  Round robin and FIFO: the nice value, so a lower nice is picked first."""
        return (req.nice,)

    def service(self, req: Request) -> float:
        """Service received, in weighted tokens: the prompt once it was dispatched, plus every generated token."""
        prompt = req.prompt_tokens if req.started else 0
        return self.input_weight * prompt + self.output_weight * req.generated

    def account(self, req: Request, delta: float) -> None:
        """``delta`` more service went to ``req``."""


class RoundRobin(Policy):
    """Round robin across identities, then across an identity's programs, then across a program's requests.

    A slot goes to the identity served longest ago, within it to the program (``Request.program``)
    served longest ago, and within that in queue order (a preempted request rejoins at the tail).
    So one agent's backlog of thousands never starves another agent's request: that one's program
    has not been served yet and goes first, while a single program's requests still rotate on
    the quantum.
    """

    name = "rr"

    def __init__(self, quantum: Quantum, **opts: Any):
        super().__init__(quantum, **opts)
        self.turns = 0
        self.served: dict[str, int] = {}  # owner or program -> the turn it was last given a slot
        self.live: dict[str, int] = {}  # owner or program -> its requests waiting or running

    def admit(self, req: Request) -> None:
        for key in share_keys(req):
            join_backlog(self.live, key)

    def release(self, req: Request) -> None:
        """A key with no request left is forgotten: its next request is served as a newcomer's."""
        for key in share_keys(req):
            if leave_backlog(self.live, key):
                self.served.pop(key, None)

    def pick(self, ready: deque[Request], worker: str) -> Request | None:
        req = super().pick(ready, worker)
        if req is not None:
            self.turns += 1
            for key in share_keys(req):
                self.served[key] = self.turns
        return req

    def priority(self, req: Request) -> tuple:
        owner, program = share_keys(req)
        return (req.nice, self.served.get(owner, 0), self.served.get(program, 0))

    def info(self, req: Request) -> dict[str, Any]:
        return super().info(req) | {"program": req.program}


class Fifo(Policy):
    name = "fifo"

    def __init__(self, quantum: Quantum, **opts: Any):
        super().__init__(Quantum(), **opts)
