"""What agents ask of the daemon: one handler per op, each given the caller and the decoded record.

A handler raises ``ProtocolError`` for bad input; the daemon's receive loop answers it
with an ``error`` event under the agent's request id, and goes on.  The caller's identity
comes from the connection (``scheduler.gate``): a request belongs to the identity that sent
it; ``ps``, ``kill`` and ``nice`` see and touch only the caller's own requests (an admin's:
all), and sessions are kept per identity, so no one reuses or probes another's context.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipc import events as E
from ipc import messages as M
from ipc import protocol as P
from scheduler.lifecycle import Lifecycle
from scheduler.outbox import Outbox
from scheduler.phase import Phase
from scheduler.prompt_size import PromptSizer
from scheduler.request import Request
from scheduler.response_store import Stored
from scheduler.stats import Views

log = logging.getLogger("quantad")


@dataclass(frozen=True)
class Caller:
    """Who sent an op: the connection's routing id, the identity ZAP gave it, and whether it is an admin."""

    addr: bytes
    identity: str | None
    admin: bool = False

    def owns(self, req: Request) -> bool:
        return self.admin or req.owner == self.identity


def acting_for(who: Caller, identity: str | None, what: str) -> Caller:
    """``who``, or the identity an admin (the HTTP front) acts for: its bearer token's."""
    if identity is None:
        return who
    if not who.admin:
        raise P.ProtocolError(P.E_BAD_FIELD, f"only an admin may {what} 'on_behalf_of' another identity")
    return Caller(who.addr, identity, admin=False)


def session_key(identity: str | None, session: str) -> str:
    """A session's name as workers and the scheduler know it: inside its owner's namespace."""
    return f"{identity}/{session}"


class AgentOps:
    def __init__(
        self,
        life: Lifecycle,
        outbox: Outbox,
        sizer: PromptSizer,
        phase: Phase,
        views: Views,
        background: Callable[[Any], None],
    ):
        self.life, self.sched, self.outbox, self.sizer = life, life.sched, outbox, sizer
        self.phase, self.views, self.background = phase, views, background

    def handlers(self) -> dict[type[M.Message], Callable[[Caller, Any, Any], None]]:
        return {
            M.Chat: self.chat,
            M.Ps: self.ps,
            M.Kill: self.kill,
            M.CancelOwn: self.cancel,
            M.Ping: self.ping,
            M.Nice: self.nice,
            M.Stats: self.stats,
            M.Workers: self.workers,
            M.Attach: self.attach,
            M.Tokenize: self.tokenize,
            M.Detokenize: self.detokenize,
            M.ResponseGet: self.response_get,
            M.ResponseDelete: self.response_delete,
            M.ResponseCancel: self.response_cancel,
        }

    def chat(self, who: Caller, cid: Any, rec: M.Chat) -> None:
        addr = who.addr
        if cid is None:
            raise P.ProtocolError(P.E_BAD_FIELD, "a chat needs an 'id' (string or integer) chosen by the agent")
        if (addr, cid) in self.life.by_client:
            raise P.ProtocolError(P.E_DUPLICATE_ID, f"request id {cid!r} is already in flight")
        if self.phase.stopping.is_set():
            raise P.ProtocolError(P.E_SHUTTING_DOWN, "the daemon is shutting down")
        params = rec.params
        if params.on_behalf_of is not None:  # the HTTP front speaks for its bearer token's identity
            who = acting_for(who, params.on_behalf_of, "submit")
            params = dataclasses.replace(params, on_behalf_of=None)
        if params.session:
            params = dataclasses.replace(params, session=session_key(who.identity, params.session))
        if params.fork:  # a group is its owner's own too
            params = dataclasses.replace(params, fork=session_key(who.identity, params.fork))
        exact = None  # with template variables the worker renders what the daemon cannot: its check decides
        if not params.template_kwargs:
            exact = self.sizer.check(params.messages, params.tools, params.max_tokens, params.prompt)
        self.life.accept(addr, cid, params, who.identity or "", who.admin, exact or 0, rec.response)

    def ps(self, who: Caller, cid: Any, rec: M.Ps) -> None:
        self.outbox.reply(who.addr, cid, self.views.ps(who.owns))

    def stats(self, who: Caller, cid: Any, rec: M.Stats) -> None:
        self.outbox.reply(who.addr, cid, self.views.stats())

    def workers(self, who: Caller, cid: Any, rec: M.Workers) -> None:
        c = self.views.cfg
        view = {"workers": self.views.workers(), "heartbeat_s": c.spec.heartbeat_s, "liveness_s": c.liveness_s}
        self.outbox.reply(who.addr, cid, view)

    def tokenize(self, who: Caller, cid: Any, rec: M.Tokenize) -> None:
        """Token ids with the workers' tokenizer."""
        if self._before_tokenizer(self.tokenize, who, cid, rec):
            return
        sizer = self.sizer
        if rec.messages is not None:
            ids = sizer.encode_chat(rec.messages, rec.add_generation_prompt)
        else:
            ids = sizer.encode(rec.prompt or "", rec.add_special_tokens)
        self.outbox.reply(who.addr, cid, {"count": len(ids), "tokens": ids, "max_model_len": sizer.known_limit})

    def detokenize(self, who: Caller, cid: Any, rec: M.Detokenize) -> None:
        if self._before_tokenizer(self.detokenize, who, cid, rec):
            return
        self.outbox.reply(who.addr, cid, {"prompt": self.sizer.decode(rec.tokens)})

    def _before_tokenizer(self, op: Callable[[Caller, Any, Any], None], who: Caller, cid: Any, rec: Any) -> bool:
        """Asked before the first worker is up (no tokenizer known yet): ``op`` answers once it is."""
        if self.sizer.source or self.phase.ready.is_set():
            return False
        self.background(self._when_ready(op, who, cid, rec))
        return True

    def _live(self, who: Caller, pid: int) -> Request:
        """The caller's live request ``pid``; another identity's is as absent as a finished one."""
        req = self.sched.table.get(pid)
        if req is None or req.finished or not who.owns(req):
            raise P.ProtocolError(P.E_NOT_FOUND, f"no live request of yours with pid {pid}")
        return req

    def kill(self, who: Caller, cid: Any, rec: M.Kill) -> None:
        self.life.cancel(self._live(who, rec.pid), "killed")
        self.outbox.reply(who.addr, cid, {"killed": rec.pid})

    def nice(self, who: Caller, cid: Any, rec: M.Nice) -> None:
        req = self._live(who, rec.pid)
        old = req.nice
        self.sched.renice(req, rec.nice)
        log.info("event=renice pid=%s old=%s nice=%s", rec.pid, old, rec.nice)
        self.outbox.reply(who.addr, cid, {"pid": rec.pid, "nice": rec.nice, "old": old})

    def cancel(self, who: Caller, cid: Any, rec: M.CancelOwn) -> None:
        if cid is None:
            raise P.ProtocolError(P.E_BAD_FIELD, "a cancel needs the 'id' of the chat to cancel")
        req = self.life.by_client.get((who.addr, cid))
        if req is None:
            raise P.ProtocolError(P.E_NOT_FOUND, f"no request with id {cid!r} in flight")
        self.life.cancel(req, "cancelled by agent")

    def attach(self, who: Caller, cid: Any, rec: M.Attach) -> None:
        """Follow a request from an offset: a client back after a restart, or ``quantad run --attach PID``."""
        out = self.outbox
        if cid is None:
            raise P.ProtocolError(P.E_BAD_FIELD, "an attach needs an 'id': the request's events come under it")
        if rec.on_behalf_of is not None:
            who = acting_for(who, rec.on_behalf_of, "attach")
        if rec.pid is not None:
            req = self.sched.table.get(rec.pid)
        else:  # the caller's own chat of this id, on this connection or (after a restart) in the journal
            req = self.life.by_client.get((who.addr, cid))
            if req is None or req.owner != (who.identity or ""):  # another connection's: search by owner
                mine = (r for r in self.sched.table.values() if r.client_id == cid and r.owner == (who.identity or ""))
                req = next(mine, None)
        if req is not None and not req.finished and who.owns(req):
            req.watch(who.addr, cid, rec.offset, rec.chars, rec.stream)
            seen = E.Attached(id=cid, pid=req.pid, state=req.state.value, tokens=req.generated, recovered=req.recovered)
            out.send_agent(who.addr, seen)
            out.emit_tokens(req)  # what it has missed, if any (everyone else has it)
            return
        ended = self.life.journal.ended(who.identity, rec.pid, cid)
        if ended is None or not (who.admin or ended.owner == (who.identity or "")):
            raise P.ProtocolError(P.E_NOT_FOUND, f"no request of yours with {self._named(rec, cid)}")
        final = ended.final
        out.send_agent(who.addr, E.Attached(id=cid, pid=ended.pid, state="ENDED"))
        text = final.text or ""
        if rec.stream and len(text) > rec.chars:
            out.send_agent(who.addr, E.Token(id=cid, pid=ended.pid, text=text[rec.chars :]))
        out.send_agent(who.addr, dataclasses.replace(final, id=cid))

    # ---- stored responses (the HTTP front's Responses API) -----------------------------------
    def response_get(self, who: Caller, cid: Any, rec: M.ResponseGet) -> None:
        """A stored response of the caller's: as kept, with how far its request has come while it runs."""
        who = acting_for(who, rec.on_behalf_of, "read")
        self.outbox.reply(who.addr, cid, self._response_view(who, rec.response_id))

    def _response_view(self, who: Caller, rid: str) -> dict[str, Any]:
        stored = self.life.responses.get(who.identity or "", rid)
        view = stored.view()
        req = self._running(stored)
        if req is not None:
            view["live"] = {"state": req.state.value, "tokens": req.generated, "text": req.text}
        return view

    def _running(self, stored: Stored) -> Request | None:
        """The live request a stored response is still waiting on (None once it has ended)."""
        req = self.sched.table.get(stored.pid) if stored.final is None else None
        return req if req is not None and not req.finished else None

    def response_delete(self, who: Caller, cid: Any, rec: M.ResponseDelete) -> None:
        """Forget a stored response; a request it still runs is cancelled with it."""
        who = acting_for(who, rec.on_behalf_of, "delete")
        stored = self.life.responses.delete(who.identity or "", rec.response_id)
        req = self._running(stored)
        if req is not None:
            self.life.cancel(req, "its response was deleted")
        self.outbox.reply(who.addr, cid, {"id": stored.id, "deleted": True})

    def response_cancel(self, who: Caller, cid: Any, rec: M.ResponseCancel) -> None:
        """Stop a background response's request wherever it is; one that has ended stays as it ended."""
        who = acting_for(who, rec.on_behalf_of, "cancel")
        stored = self.life.responses.get(who.identity or "", rec.response_id)
        if not stored.background:
            raise P.ProtocolError(P.E_BAD_FIELD, f"response {stored.id!r} did not run in the background")
        req = self._running(stored)
        if req is not None:
            self.life.cancel(req, "cancelled")
        self.outbox.reply(who.addr, cid, self._response_view(who, rec.response_id))

    @staticmethod
    def _named(rec: M.Attach, cid: Any) -> str:
        return f"pid {rec.pid}" if rec.pid is not None else f"id {cid!r}"

    def ping(self, who: Caller, cid: Any, rec: M.Ping) -> None:
        """``wait: true`` holds the answer until every worker is up (clients wait on an event, not a timer)."""
        addr = who.addr
        if rec.wait and not self.phase.ready.is_set():
            self.background(self._when_ready(self.ping, who, cid, rec))
            return
        self._pong(addr, cid)

    async def _when_ready(self, op: Callable[[Caller, Any, Any], None], who: Caller, cid: Any, rec: Any) -> None:
        await self.phase.ready.wait()
        try:
            op(who, cid, rec)
        except P.ProtocolError as exc:  # off the receive loop: answered here as it would answer
            self.outbox.error(who.addr, cid, exc.code, exc.message)

    def _pong(self, addr: bytes, cid: Any) -> None:
        workers = self.sched.workers.values()
        self.outbox.reply(
            addr, cid, {"pong": True, "workers": len(workers), "workers_ready": sum(w.alive for w in workers)}
        )
