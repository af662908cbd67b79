"""The scheduler's logic, free of sockets: add, schedule, quantum_end, preempt, finish.

Like nano-vllm's scheduler: a run queue (``ready``) and the running set, one ``Request``
object per syscall.  The daemon feeds it events and sends what it decides.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from scheduler.policy import Policy
from scheduler.request import Request, State


@dataclass
class WorkerSlots:
    """The daemon's view of one worker: its capacity and what runs on it."""

    name: str
    slots: int = 1
    alive: bool = False
    running: set[int] = field(default_factory=set)
    info: dict = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.slots - len(self.running) if self.alive else 0


class Scheduler:
    def __init__(self, policy: Policy):
        self.policy = policy
        self.ready: deque[Request] = deque()
        self.table: dict[int, Request] = {}
        self.workers: dict[str, WorkerSlots] = {}

    def add(self, req: Request) -> None:
        self.table[req.pid] = req
        req.move(State.READY)
        self.policy.admit(req)
        self.policy.enqueue(self.ready, req)

    def schedule(self) -> list[Request]:
        """Fill free slots from the run queue; return the requests to start now.

        Affinity first: a slot takes a request with no context or with its context here.
        Only when none is left does it take one whose context sits on a worker with no free
        slot: that context migrates (``migrate_from`` is set) rather than waiting.
        """
        started = []
        for w in self.workers.values():  # the service given so far ranks the waiting (fair, plas)
            for pid in w.running:
                if pid in self.table:
                    self.policy.charge(self.table[pid])
        for w in self.workers.values():
            while w.free > 0:
                req = self.policy.pick(self.ready, w.name) or self._migrant(w.name)
                if req is None:
                    break
                self.ready.remove(req)
                if req.worker not in (None, w.name) and req.tier != "none":  # a context to bring along
                    req.migrate_from = req.worker
                    req.migrations += 1
                req.worker = w.name
                req.started = True
                req.move(State.RUNNING)
                w.running.add(req.pid)
                started.append(req)
        return started

    def _migrant(self, worker: str) -> Request | None:
        for req in self.ready:
            home = self.workers.get(req.worker or "")
            if home is not None and home.name != worker and home.alive and home.free == 0:
                return req
        return None

    def waiting_for(self, worker: str, running: Request | None = None) -> int:
        """How many queued requests could take a slot on ``worker`` (from ``running``, if given)."""
        return sum(
            r.worker in (None, worker) and (running is None or self.policy.may_preempt(running, r)) for r in self.ready
        )

    def quantum_end(self, req: Request, emitted: int) -> bool:
        """Checkpoint a finished quantum; True when the request must yield its slot.

        Yield only while more requests that the policy lets preempt this one wait for this
        worker than slots are already being given up on it, so several quanta ending in one
        batched step free just enough slots.
        """
        req.quanta += 1
        req.checkpoint = emitted
        self.policy.charge(req)
        self.policy.quantum_used(req)
        w = self.workers[req.worker]
        yielding = sum(self.table[pid].preempt_pending for pid in w.running if pid in self.table)
        req.preempt_pending = self.waiting_for(req.worker, req) > yielding
        return req.preempt_pending

    def preempt(self, req: Request) -> None:
        """The worker has saved the context: back to the tail of the run queue."""
        self._release(req)
        self.policy.charge(req)
        req.preempt_pending = False
        req.preemptions += 1
        req.move(State.READY)
        self.policy.enqueue(self.ready, req)

    def finish(self, req: Request, state: State) -> dict:
        """Leave the run queue and the policy; returns the policy's last view of the request (for its stats)."""
        self._release(req)
        if req in self.ready:
            self.ready.remove(req)
        view: dict = {}
        if not req.finished:
            self.policy.charge(req)
            view = {"nice": req.nice, "prompt_tokens": req.prompt_tokens, **self.policy.info(req)}
            self.policy.release(req)
        req.move(state)
        return view

    def renice(self, req: Request, nice: int) -> None:
        """Change a live request's nice value; it counts from the next pick or quantum end."""
        self.policy.charge(req)  # service so far is weighed with the old value
        req.nice = nice

    def worker_lost(self, name: str) -> list[Request]:
        """Requests that ran on or kept context in a dead worker restart from their checkpoint."""
        w = self.workers.get(name)
        if w is not None:
            w.alive = False
            w.running.clear()
        lost = [r for r in self.table.values() if r.worker == name and not r.finished]
        for req in lost:
            req.worker, req.tier, req.context_bytes = None, "none", 0
            req.restarts += 1
            req.preempt_pending = False
            req.migrate_from = None
            if req.state is State.RUNNING:
                req.move(State.READY)
                self.ready.appendleft(req)
        return lost

    def forget(self, req: Request) -> None:
        self.table.pop(req.pid, None)

    def _release(self, req: Request) -> None:
        w = self.workers.get(req.worker or "")
        if w is not None:
            w.running.discard(req.pid)
