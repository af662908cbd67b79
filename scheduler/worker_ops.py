"""What workers tell the daemon, and what the daemon tells them to run a request.

One handler per record from a worker.  News about a request counts only from the worker
it runs on: anything else is late news (of a cancelled or re-queued request) and is
dropped.  The migration relay is here too: a context exported by one worker travels,
frames untouched, to the worker that runs the request next (or straight to that worker's
inbox, when the exporter could push it there).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from ipc import events as E
from ipc import messages as M
from ipc import protocol as P
from ipc.tensor_frames import check, spec_bytes
from scheduler import tool_events
from scheduler.lifecycle import Lifecycle
from scheduler.outbox import Outbox
from scheduler.phase import Phase
from scheduler.prompt_size import PromptSizer
from scheduler.request import Request, State
from scheduler.workers import Worker

log = logging.getLogger("quantad")

Handler = Callable[[Worker, Any, list], None]


def running(handler: Callable[[WorkerOps, Request, Any], None]) -> Handler:
    """A handler of news about a request: only from the worker it runs on, and only while it is live."""

    @functools.wraps(handler)
    def on(self: WorkerOps, w: Worker, rec: Any, frames: list) -> None:
        req = self.sched.running_on(w.name, rec.rid)
        if req is not None:
            handler(self, req, rec)

    return on


def with_cached(usage: dict, reused: int | None) -> dict:
    """OpenAI's usage with ``prompt_tokens_details.cached_tokens``: the prompt tokens whose state was reused."""
    return {**usage, "prompt_tokens_details": {"cached_tokens": reused or 0}}


class WorkerOps:
    def __init__(
        self, life: Lifecycle, outbox: Outbox, sizer: PromptSizer, phase: Phase, all_ready: Callable[[], None]
    ):
        self.life, self.sched, self.outbox, self.sizer, self.phase = life, life.sched, outbox, sizer, phase
        self.all_ready = all_ready  # every worker is up for the first time: the daemon serves

    def handlers(self) -> dict[type[M.Message], Handler]:
        return {
            M.Ready: self.ready,
            M.Heartbeat: self.heartbeat,
            M.Exported: self.exported,
            M.Tokens: self.tokens,
            M.StepTokens: self.step_tokens,
            M.QuantumEnd: self.quantum_end,
            M.Preempted: self.preempted,
            M.Finished: self.finished,
            M.Failed: self.failed,
            M.Context: self.context,
        }

    # ---- to workers -----------------------------------------------------------------------
    def start(self, req: Request) -> None:
        """A request the scheduler just placed: run it there, or first fetch its context from where it lies."""
        if req.migrate_from is not None:  # its context comes from another worker first
            log.info("event=migrate pid=%s from=%s to=%s", req.pid, req.migrate_from, req.worker)
            peer = self.sched.workers[req.worker].peer  # the importer's inbox: one hop, not two
            self.outbox.to_worker(req.migrate_from, M.Export(req.pid, peer))
            return
        self.run(req)  # carries all a worker without the context needs to rebuild it
        if req.quanta > 0:  # after ``run``: if the agent is gone, the cancel follows the run
            self.outbox.emit(req, E.Resumed(pid=req.pid, worker=req.worker, context=req.tier, tokens=req.generated))

    def run(
        self, req: Request, frames: list | None = None, migrate: dict | None = None, tensors: list | None = None
    ) -> None:
        quantum = self.sched.policy.quantum_for(req)
        run = M.Run(
            req.pid,
            req.params,
            quantum,
            resume_ids=req.tokens,
            resume_text=req.text,
            resume_tokens=req.generated,
            emitted_chars=len(req.text),
            migrate=migrate,
            tensors=tensors or [],
            owner=req.owner,
        )
        self.outbox.to_worker(req.worker, run, frames)

    def restart_on(self, req: Request) -> None:
        """Run a request on its assigned worker from its streamed tokens (context lost)."""
        self.sched.restart_on(req)
        self.run(req)

    def next_quantum(self, req: Request) -> None:
        self.outbox.to_worker(req.worker, M.Continue(req.pid, self.sched.policy.quantum_for(req)))

    # ---- the worker itself ----------------------------------------------------------------
    def remote(self, name: str, rec: Any) -> Worker:
        """A worker the daemon did not start (``quantad worker --connect``), let in by its key, joins."""
        if not isinstance(rec, M.Ready):
            raise P.ProtocolError(P.E_BAD_FRAME, f"remote worker {name!r} spoke before its ready")
        w = self.sched.workers[name] = Worker(name, rec.slots)
        log.info("event=remote_worker worker=%s", name)
        return w

    def ready(self, w: Worker, rec: M.Ready, frames: list) -> None:
        if w.alive or any(r.worker == w.name for r in self.sched.table.values()):
            self.lose(w)  # it restarted: whatever it held is gone
        w.up(rec)
        self.sizer.learn(rec.max_context, rec.tokenizer)
        log.info("event=worker_ready worker=%s device=%s slots=%s", w.name, rec.device, w.slots)
        self.adopt(w, rec.orphans)
        if all(x.alive for x in self.sched.workers.values()) and not self.phase.ready.is_set():
            self.all_ready()
        self.life.settle()

    def adopt(self, w: Worker, pids: list[int]) -> None:
        """Context files a dead worker left: a queued request whose context is nowhere else resumes from its file.

        Any other file (a request that ended, or whose context lives on elsewhere) is deleted.
        """
        for pid in pids:
            req = self.sched.table.get(pid)
            if req is not None and self.sched.adopt(req, w.name):
                log.info("event=adopt pid=%s worker=%s", pid, w.name)
            else:
                self.outbox.to_worker(w.name, M.Cancel(pid))

    def lose(self, w: Worker) -> None:
        """Everything the worker held is gone: contexts it was exporting, and the requests it ran or kept."""
        for req in self.sched.exporting_from(w.name):  # its context died with the exporter
            self.restart_on(req)
        for req in self.sched.worker_lost(w.name):
            log.info("event=requeue pid=%s tokens=%s", req.pid, len(req.tokens))
        self.life.settle()

    def heartbeat(self, w: Worker, rec: M.Heartbeat, frames: list) -> None:
        w.beat = rec

    # ---- the migration relay --------------------------------------------------------------
    def exported(self, w: Worker, rec: M.Exported, frames: list) -> None:
        """Relay a migrating context, frames untouched (zero copy), to the worker that runs it."""
        req = self.sched.table.get(rec.rid)
        if req is None or req.finished or req.migrate_from != w.name:
            return
        try:
            if rec.lost:
                raise P.ProtocolError(P.E_NOT_FOUND, "the exporting worker no longer had the context")
            if rec.migrate is None:
                raise P.ProtocolError(P.E_BAD_FIELD, "missing field 'migrate'")
            specs = rec.tensors  # direct: the frames went straight to the importer's inbox
            nbytes = spec_bytes(specs) if rec.direct else sum(len(f) for f in frames)
            if not rec.direct:
                specs = check(specs, frames)
        except P.ProtocolError as exc:  # rebuild from the tokens instead
            log.warning("event=migrate_fallback pid=%s why=%r", req.pid, exc.message)
            self.restart_on(req)
            return
        self.sched.migrated(req, nbytes)  # moved between workers
        if rec.direct:
            self.run(req, migrate=rec.migrate)
        else:
            self.run(req, frames, migrate=rec.migrate, tensors=specs)
        moved = E.Resumed(
            pid=req.pid, worker=req.worker, context=req.tier, tokens=req.generated, migrated=True, direct=rec.direct
        )
        self.outbox.emit(req, moved)

    # ---- a running request ----------------------------------------------------------------
    @running
    def tokens(self, req: Request, rec: M.Tokens) -> None:
        req.note_output(rec.ids, rec.text, rec.count, rec.logprobs)
        self.life.counters.tokens += rec.count
        if rec.text or rec.ids:
            self.outbox.emit_tokens(req)  # each follower gets what it has not had (``Request.unsent``)

    def step_tokens(self, w: Worker, rec: M.StepTokens, frames: list) -> None:
        """Several rows' tokens: each as its own ``tokens`` (a malformed row is refused, the others count)."""
        for row in rec.rows:
            try:
                one = M.StepTokens.record(row)
            except P.ProtocolError as exc:
                log.error("event=bad_worker_message code=%s message=%.200r", exc.code, exc.message)
                continue
            self.tokens(w, one, frames)

    @running
    def quantum_end(self, req: Request, rec: M.QuantumEnd) -> None:
        self.life.journal.checkpoint(req)  # its output so far, committed with this loop turn's others
        if self.sched.quantum_end(req, rec.emitted, rec.prompt_tokens, rec.preemptible, rec.prompt_reused):
            self.outbox.to_worker(req.worker, M.Preempt(req.pid))
        else:
            self.next_quantum(req)

    @running
    def preempted(self, req: Request, rec: M.Preempted) -> None:
        self.sched.preempt(req, rec.tier, rec.bytes, rec.switch_s)
        self.life.counters.preemptions += 1
        log.info("event=preempted pid=%s tier=%s bytes=%s", req.pid, req.tier, req.context_bytes)
        self.outbox.emit(req, E.Preempted(pid=req.pid, quantum=req.quanta, tokens=req.generated, context=req.tier))
        self.life.settle()

    @running
    def context(self, req: Request, rec: M.Context) -> None:
        req.note_context(rec.tier, rec.bytes)

    @running
    def finished(self, req: Request, rec: M.Finished) -> None:
        self.sched.last_quantum(req, rec.prompt_tokens, rec.prompt_reused)
        if rec.session_kept:
            self.sched.keep_session(req)
        log.info(
            "event=done pid=%s tokens=%s quanta=%s preemptions=%s", req.pid, req.generated, req.quanta, req.preemptions
        )
        done = E.Done(
            pid=req.pid,
            worker=req.worker or "",
            text=req.text,
            finish_reason=rec.finish_reason,
            content=rec.content,
            tool_calls=rec.tool_calls,
            usage=with_cached(rec.usage, rec.prompt_reused),
            stats=rec.stats,
            logprobs=req.logprobs if req.params.logprobs else None,
            content_tail=(tool_events.tail(req) or None) if tool_events.splits(req) else None,
        )
        self.life.terminal(req, State.DONE, done)

    @running
    def failed(self, req: Request, rec: M.Failed) -> None:
        self.life.fail(req, rec.agent_code, rec.message)
