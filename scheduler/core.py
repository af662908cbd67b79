"""The scheduler's logic, free of sockets: add, schedule, quantum_end, preempt, finish.

Like nano-vllm's scheduler: a run queue (``ready``) and the running set, one ``Request``
object per syscall.  The daemon feeds it events and sends what it decides.  Every change
of a request's state happens here or in a ``Request`` method, never in the daemon.
"""

from __future__ import annotations

from collections import deque

from ipc.protocol import TIER_DISK, TIER_NONE
from scheduler.policy import Policy
from scheduler.request import Request, State
from scheduler.workers import Worker

PARKED_PER_SLOT = 2  # parked (preempted) contexts per slot before new requests wait for them to finish
MIN_PARKED = 8


class Scheduler:
    def __init__(self, policy: Policy):
        self.policy = policy
        self.ready: deque[Request] = deque()
        self.table: dict[int, Request] = {}
        self.workers: dict[str, Worker] = {}

    # ---- a request's life ---------------------------------------------------------------
    def add(self, req: Request) -> None:
        """A new request joins the run queue; one of a session goes to the worker keeping its context."""
        home = self.session_home(req.session) or self.fork_home(req.params.fork)
        if home is not None and home.alive:
            req.worker = home.name  # affinity: that worker holds the session's context, or prefills the group's
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
                req = self.policy.pick(self._candidates(), w.name) or self._migrant(w.name)
                if req is None:
                    break
                self._start(req, w)
                started.append(req)
        return started

    def _candidates(self) -> deque[Request]:
        """The run queue, or only its parked requests when enough of them hold contexts already.

        A deep backlog would otherwise start every request once and park them all (thousands of
        contexts swapped out, each resumed for one quantum): past ``PARKED_PER_SLOT`` parked contexts
        per slot, the parked finish before anything new starts.
        """
        bound = PARKED_PER_SLOT * sum(w.slots for w in self.workers.values())
        parked = sum(r.started for r in self.ready)
        if parked < max(bound, MIN_PARKED):
            return self.ready
        return deque(r for r in self.ready if r.started)

    def _start(self, req: Request, w: Worker) -> None:
        self.ready.remove(req)
        if req.worker not in (None, w.name) and req.tier != TIER_NONE:  # a context to bring along
            req.migrate_from = req.worker
            req.migrations += 1
        req.worker = w.name
        req.started = True
        req.move(State.RUNNING)
        w.running.add(req.pid)
        if req.migrate_from is None:  # it runs there now: with that worker's ability to resume it
            req.preemptible = w.preemptible
            if req.quanta > 0 and req.tier != TIER_NONE:
                req.note_moved(req.tier, req.context_bytes)  # restored from there

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

    def quantum_end(
        self,
        req: Request,
        emitted: int,
        prompt_tokens: int | None = None,
        preemptible: bool | None = None,
        prompt_reused: int | None = None,
    ) -> bool:
        """Checkpoint a finished quantum; True when the request must yield its slot.

        Yield only while more requests that the policy lets preempt this one wait for this
        worker than slots are already being given up on it, so several quanta ending in one
        batched step free just enough slots.  A request its worker cannot resume never
        yields: it runs to the end of its turn.  ``prompt_tokens`` is the exact count from
        the worker's tokenizer, when it sent one.
        """
        if preemptible is not None:
            req.preemptible = preemptible
        self._exact_prompt(req, prompt_tokens, prompt_reused)
        req.quanta += 1
        self.policy.charge(req)
        self.policy.quantum_used(req)
        last, req.checkpoint = req.checkpoint, emitted
        w = self.workers[req.worker]
        yielding = sum(self.table[pid].preempt_pending for pid in w.running if pid in self.table)
        # A request that would end within another quantum like this one is not parked (time quanta only:
        # token quanta are the tests' exact preemption points).
        timed = not self.policy.quantum_for(req).tokens
        near_end = timed and bool(req.max_tokens) and req.max_tokens - emitted <= emitted - last
        req.preempt_pending = (
            not near_end and self.waiting_for(req.worker, req) > yielding and req.preemptible is not False
        )
        return req.preempt_pending

    def preempt(self, req: Request, tier: str | None = None, nbytes: int = 0, switch_s: float = 0.0) -> None:
        """The worker has saved the context (into ``tier``): back to the tail of the run queue."""
        if tier is not None:
            req.note_context(tier, nbytes)
            req.switch_s += switch_s
        self._release(req)
        self.policy.charge(req)
        req.preempt_pending = False
        req.preemptions += 1
        req.move(State.READY)
        self.policy.enqueue(self.ready, req)

    def last_quantum(self, req: Request, prompt_tokens: int | None = None, prompt_reused: int | None = None) -> None:
        """Its worker finished it: the last quantum counts, and the prompt length it reports is exact."""
        req.quanta += 1
        self._exact_prompt(req, prompt_tokens, prompt_reused)

    @staticmethod
    def _exact_prompt(req: Request, prompt_tokens: int | None, prompt_reused: int | None) -> None:
        """The worker's own counts: the prompt's length, and how much of it its cache held."""
        if prompt_tokens is not None:
            req.prompt_tokens = max(0, prompt_tokens)
        if prompt_reused is not None:
            req.prompt_reused = min(max(0, prompt_reused), req.prompt_tokens)

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

    def forget(self, req: Request) -> None:
        self.table.pop(req.pid, None)

    # ---- contexts that move or are lost -------------------------------------------------
    def migrated(self, req: Request, nbytes: int) -> None:
        """Its context arrived from the exporting worker (``nbytes`` over the network)."""
        req.migrate_from = None
        req.note_moved("network", nbytes)

    def adopt(self, req: Request, worker: str) -> bool:
        """``worker`` holds a file of ``req``'s context a dead worker left: it runs there if it waits with none."""
        if req.state is not State.READY or req.worker is not None:
            return False
        req.worker, req.tier = worker, TIER_DISK
        return True

    def restart_on(self, req: Request) -> None:
        """Its context is lost: it runs again on its assigned worker from its streamed tokens."""
        req.migrate_from = None
        req.tier, req.context_bytes = TIER_NONE, 0
        req.restarts += 1

    def exporting_from(self, name: str) -> list[Request]:
        """Live requests whose context worker ``name`` is exporting right now."""
        return [r for r in self.table.values() if r.migrate_from == name and not r.finished]

    def running_on(self, name: str, pid: int) -> Request | None:
        """Request ``pid`` if it is live and ``name`` is its worker (else the news is late: cancelled, re-queued)."""
        req = self.table.get(pid)
        return req if req is not None and not req.finished and req.worker == name else None

    def worker_lost(self, name: str) -> list[Request]:
        """Requests that ran on or kept context in a dead worker restart from their checkpoint."""
        w = self.workers.get(name)
        if w is not None:
            w.lost()
        lost = [r for r in self.table.values() if r.worker == name and not r.finished]
        for req in lost:
            req.worker, req.tier, req.context_bytes = None, TIER_NONE, 0
            req.restarts += 1
            req.preempt_pending = False
            req.migrate_from = None
            if req.state is State.RUNNING:
                req.move(State.READY)
                self.ready.appendleft(req)
        return lost

    # ---- sessions and policies ----------------------------------------------------------
    def fork_home(self, group: str | None) -> Worker | None:
        """The worker a live request of fork ``group`` was placed on: its prompt is prefilled once, there."""
        if not group:
            return None
        for r in self.table.values():
            if r.params.fork == group and not r.finished and r.worker is not None:
                return self.workers.get(r.worker)
        return None

    def session_home(self, session: str) -> Worker | None:
        """The worker keeping ``session``'s context, if one does."""
        return next((w for w in self.workers.values() if session in w.sessions), None)

    def keep_session(self, req: Request) -> None:
        """Its worker kept the finished request's context under its session: the next turn goes there."""
        for w in self.workers.values():
            w.sessions.discard(req.session)
        self.workers[req.worker].sessions.add(req.session)

    def live(self) -> list[Request]:
        """The requests not ended yet, queued or running."""
        return [r for r in self.table.values() if not r.finished]

    def set_policy(self, policy: Policy) -> list[Request]:
        """Switch policies live; returns the running requests, which take the new policy's quantum now."""
        self.policy = policy
        live = self.live()
        for req in live:  # the new policy starts from what is live now
            policy.admit(req)
        return [r for r in live if r.state is State.RUNNING and r.worker is not None and r.migrate_from is None]

    def _release(self, req: Request) -> None:
        w = self.workers.get(req.worker or "")
        if w is not None:
            w.running.discard(req.pid)
