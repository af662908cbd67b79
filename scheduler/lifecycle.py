"""The life of a request, from its acceptance to its one end, in one owner.

Accepting admits it against its owner's quota, commits it to the journal (before it is
acknowledged: a restart finds it), indexes it by its agent's connection and id, and queues it.
Its end (done, failed, cancelled, or handed over to the next daemon) leaves the scheduler and
the index, releases its quota, is counted, told to the finish hooks (metrics) and to its
followers, and written to the journal, once.  What the daemon does next (schedule the freed
slot, end a drain) is the ``settle`` it is given; this module sends nothing but through the outbox.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable
from typing import Any

from ipc import events as E
from ipc import messages as M
from ipc import protocol as P
from scheduler.core import Scheduler
from scheduler.counters import Counters
from scheduler.journal import Journal, NullJournal
from scheduler.limits import Admission
from scheduler.outbox import Outbox
from scheduler.request import Request, State
from scheduler.response_store import ResponseStore

log = logging.getLogger("quantad")


class Lifecycle:
    def __init__(
        self,
        sched: Scheduler,
        outbox: Outbox,
        journal: Journal | NullJournal,
        admission: Admission,
        settle: Callable[[], None],
        responses: ResponseStore | None = None,
    ):
        self.sched, self.outbox, self.journal, self.admission = sched, outbox, journal, admission
        self.responses = responses or ResponseStore(None)  # stored responses (Responses API), beside the journal
        self.settle = settle  # after a change: schedule what can run, and end a drain with nothing left
        self.pids = itertools.count(1 + journal.max_pid())
        self.by_client: dict[tuple[bytes, Any], Request] = {}  # (agent connection, its request id) -> request
        self.counters = Counters()
        self.finish_hooks: list[Callable[[Request], None]] = []  # called once per request, at its end

    # ---- a request's start ------------------------------------------------------------------
    def accept(
        self, addr: bytes, cid: Any, params: dict[str, Any], owner: str, admin: bool, prompt: int, keep: M.Keep | None
    ) -> Request:
        """A new chat: admitted (``quota_exceeded``: nothing of it is kept), journaled, indexed, queued.

        ``keep``: the stored response it runs, kept first (a crash before the request's own commit
        leaves it failed at the next start, never running); a background one is followed by nobody.
        """
        req = Request(pid=next(self.pids), agent_addr=addr, client_id=cid, params=params, owner=owner,
                      prompt_tokens=prompt)  # fmt: skip
        self.admission.admit(req.owner, req.cost, admin)
        if keep is not None:
            try:
                self.responses.put(keep.id, req.owner, req.pid, keep.background, keep.record, keep.input)
            except P.ProtocolError:
                self.admission.release(req.owner, req.cost)
                raise
            req.mark_stored()
        self.journal.accept(req)  # committed before it is acknowledged: a restart finds it
        self.by_client[(addr, cid)] = req
        self.sched.add(req)
        self.counters.accepted += 1
        log.info("event=accepted pid=%s id=%r agent=%r max_tokens=%s", req.pid, cid, req.agent, req.max_tokens)
        self.outbox.emit(req, E.Accepted(pid=req.pid))
        if keep is not None and keep.background:
            req.detach()
        self.settle()
        return req

    def recover(self) -> None:
        """Requests a dead predecessor accepted and did not end: queued first, from their last checkpoint."""
        back = self.journal.unfinished()
        stored = self.responses.running()
        self.responses.lost(stored - {r.pid for r in back})
        for req in back:
            if req.pid in stored:
                req.mark_stored()
            self.admission.admit(req.owner, req.cost, True)  # counted against its owner; never refused
            self.by_client[(req.agent_addr, req.client_id)] = req
            self.sched.add(req)
        if back:
            ms, tokens = 1e3 * self.journal.recovery_s, sum(r.generated for r in back)
            log.info("event=recovered requests=%s tokens=%s read_ms=%.1f", len(back), tokens, ms)

    # ---- a request's end --------------------------------------------------------------------
    def terminal(self, req: Request, state: State, ev: E.Done | E.Error | E.Cancelled) -> None:
        """The one terminal reply of a request: leave the tables, then tell its followers."""
        policy_view = self.retire(req, state)
        ev = dataclasses.replace(ev, stats=req.stats() | policy_view | (ev.stats or {}))
        self.outbox.emit(req, ev)
        self._ended(req, ev)
        self.settle()

    def cancel(self, req: Request, why: str, notify: bool = True, reschedule: bool = True) -> None:
        if req.finished:
            return
        self._stop_on_worker(req)
        log.info("event=cancelled pid=%s why=%r", req.pid, why)
        ev = E.Cancelled(pid=req.pid, message=why, text=req.text)
        if notify:
            self.terminal(req, State.CANCELLED, ev)
            return
        self.retire(req, State.CANCELLED)
        self._ended(req, ev)
        if reschedule:
            self.settle()

    def _ended(self, req: Request, ev: E.Done | E.Error | E.Cancelled) -> None:
        self.journal.end(req, ev)
        if req.stored:  # its response keeps how it ended (committed now: it outlives the journal's row)
            self.responses.end(req.pid, ev)

    def fail(self, req: Request, code: str, message: str) -> None:
        self._stop_on_worker(req)
        self.terminal(req, State.FAILED, E.Error(pid=req.pid, code=code, message=message, text=req.text, stats={}))

    def hand_over(self, req: Request, why: str) -> None:
        """Stopping: ``req`` stays unfinished in the journal for the next daemon; its followers are told so."""
        self._stop_on_worker(req)
        self.retire(req, State.CANCELLED)
        self.journal.keep_unfinished([req])
        ev = E.Error(pid=req.pid, code=P.E_SHUTTING_DOWN, message=why, text=req.text, resumable=True)
        self.outbox.emit(req, ev)

    def agent_gone(self, addr: bytes) -> None:
        """An agent's connection is gone: its requests lose a follower; those left with none are cancelled."""
        gone = [r for r in self.sched.table.values() if not r.finished and r.unwatch(addr)]
        for req in gone:  # one pass, one schedule: thousands of them must not hold the loop
            self.cancel(req, "agent disconnected", notify=False, reschedule=False)
        if gone:
            self.settle()

    def retire(self, req: Request, state: State) -> dict:
        """Leave the scheduler and the tables; count it and tell the hooks (metrics).  The policy's last view."""
        if not req.finished:
            self.admission.release(req.owner, req.cost)
        policy_view = self.sched.finish(req, state)
        self.counters.finish(req.state.value)
        for hook in self.finish_hooks:
            try:
                hook(req)
            except Exception:
                log.exception("event=internal_error side=finish_hook pid=%s", req.pid)
        self.by_client.pop((req.agent_addr, req.client_id), None)
        self.sched.forget(req)
        return policy_view

    def _stop_on_worker(self, req: Request) -> None:
        if req.worker is not None:
            self.outbox.to_worker(req.worker, M.Cancel(req.pid))
