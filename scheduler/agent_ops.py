"""What agents ask of the daemon: one handler per op, each given the decoded record.

A handler raises ``ProtocolError`` for bad input; the daemon's receive loop answers it
with an ``error`` event under the agent's request id, and goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ipc import messages as M
from ipc import protocol as P
from scheduler.request import Request
from scheduler.stats import ps_view, stats_view, workers_view

if TYPE_CHECKING:
    from scheduler.daemon import Daemon

log = logging.getLogger("quantad")


class AgentOps:
    def __init__(self, daemon: Daemon):
        self.d = daemon

    def handlers(self) -> dict[type[M.Message], Callable[[bytes, Any, Any], None]]:
        return {
            M.Chat: self.chat,
            M.Ps: self.ps,
            M.Kill: self.kill,
            M.CancelOwn: self.cancel,
            M.Ping: self.ping,
            M.Nice: self.nice,
            M.Stats: self.stats,
            M.Workers: self.workers,
        }

    def chat(self, addr: bytes, cid: Any, rec: M.Chat) -> None:
        d = self.d
        if cid is None:
            raise P.ProtocolError(P.E_BAD_FIELD, "a chat needs an 'id' (string or integer) chosen by the agent")
        if (addr, cid) in d.by_client:
            raise P.ProtocolError(P.E_DUPLICATE_ID, f"request id {cid!r} is already in flight")
        if d.stopping.is_set():
            raise P.ProtocolError(P.E_SHUTTING_DOWN, "the daemon is shutting down")
        req = Request(pid=next(d.pids), agent_addr=addr, client_id=cid, params=rec.params)
        d.by_client[(addr, cid)] = req
        d.sched.add(req)
        d.counters.accepted += 1
        log.info("event=accepted pid=%s id=%r agent=%r max_tokens=%s", req.pid, cid, req.agent, req.max_tokens)
        d.emit(req, P.EV_ACCEPTED, pid=req.pid)
        d.schedule()

    def ps(self, addr: bytes, cid: Any, rec: M.Ps) -> None:
        self.d.reply(addr, cid, ps_view(self.d))

    def stats(self, addr: bytes, cid: Any, rec: M.Stats) -> None:
        self.d.reply(addr, cid, stats_view(self.d))

    def workers(self, addr: bytes, cid: Any, rec: M.Workers) -> None:
        c = self.d.cfg
        view = {"workers": workers_view(self.d), "heartbeat_s": c.spec.heartbeat_s, "liveness_s": c.liveness_s}
        self.d.reply(addr, cid, view)

    def _live(self, pid: int) -> Request:
        req = self.d.sched.table.get(pid)
        if req is None or req.finished:
            raise P.ProtocolError(P.E_NOT_FOUND, f"no live request with pid {pid}")
        return req

    def kill(self, addr: bytes, cid: Any, rec: M.Kill) -> None:
        self.d.cancel(self._live(rec.pid), "killed")
        self.d.reply(addr, cid, {"killed": rec.pid})

    def nice(self, addr: bytes, cid: Any, rec: M.Nice) -> None:
        req = self._live(rec.pid)
        old = req.nice
        self.d.sched.renice(req, rec.nice)
        log.info("event=renice pid=%s old=%s nice=%s", rec.pid, old, rec.nice)
        self.d.reply(addr, cid, {"pid": rec.pid, "nice": rec.nice, "old": old})

    def cancel(self, addr: bytes, cid: Any, rec: M.CancelOwn) -> None:
        req = self.d.by_client.get((addr, cid))
        if req is None:
            raise P.ProtocolError(P.E_NOT_FOUND, f"no request with id {cid!r} in flight")
        self.d.cancel(req, "cancelled by agent")

    def ping(self, addr: bytes, cid: Any, rec: M.Ping) -> None:
        """``wait: true`` holds the answer until every worker is up (clients wait on an event, not a timer)."""
        if rec.wait and not self.d.ready.is_set():
            self.d.background(self._pong_when_ready(addr, cid))
            return
        self._pong(addr, cid)

    async def _pong_when_ready(self, addr: bytes, cid: Any) -> None:
        await self.d.ready.wait()
        self._pong(addr, cid)

    def _pong(self, addr: bytes, cid: Any) -> None:
        workers = self.d.sched.workers.values()
        self.d.reply(addr, cid, {"pong": True, "workers": len(workers), "workers_ready": sum(w.alive for w in workers)})
