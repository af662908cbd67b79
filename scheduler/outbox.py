"""Everything the daemon sends: replies and events to agents, orders to workers.

Sends are non-blocking, on synchronous shadows of the asyncio sockets, so a failure shows up
here, where it is handled: an agent that is gone or not reading is reported to
``on_agent_gone`` (the lifecycle cancels what only it followed); a worker that cannot be
reached is logged (the supervisor notices it dies).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from ipc import messages as M
from ipc import protocol as P
from scheduler import tool_events
from scheduler.request import Request

log = logging.getLogger("quantad")


class Outbox:
    def __init__(self, agents: zmq.asyncio.Socket, workers: zmq.asyncio.Socket):
        self.agents, self.workers = agents, workers
        self._agents_tx = zmq.Socket.shadow(agents.underlying)
        self._workers_tx = zmq.Socket.shadow(workers.underlying)
        self.seq = itertools.count(1)
        self.on_agent_gone: Callable[[bytes], None] = lambda addr: None

    def reply(self, addr: bytes, cid: Any, data: dict) -> None:
        self.send_agent(addr, {"event": P.EV_REPLY, "id": cid, "data": data})

    def error(self, addr: bytes, cid: Any, code: str, message: str) -> None:
        self.send_agent(addr, {"event": P.EV_ERROR, "id": cid, "code": code, "message": message})

    def send_agent(self, addr: bytes, msg: dict) -> bool:
        msg["seq"] = next(self.seq)
        try:
            self._agents_tx.send_multipart([addr, P.pack(msg)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: agent gone; EAGAIN: agent not reading
            log.info("event=agent_gone errno=%s", exc.errno)
            self.on_agent_gone(addr)
            return False
        finally:
            self.agents.get(zmq.EVENTS)  # re-arm the pending receive: see to_worker

    def emit(self, req: Request, event: str, **fields: Any) -> None:
        """An event of ``req`` to everyone following it; a token event carries what each has not had yet."""
        for (addr, cid), w in list(req.watchers.items()):
            if not w.stream and event in (P.EV_TOKEN, P.EV_PREEMPTED, P.EV_RESUMED):
                continue
            msg, calls = {"event": event, "id": cid, "pid": req.pid, **fields}, []
            if event == P.EV_TOKEN:
                start, had, out = w.tokens, w.chars, req.unsent(w)
                if out is None:  # recomputed after a restart: it has these already
                    continue
                msg["text"], msg["token_ids"] = out
                msg["index"], msg["chars"] = req.generated, len(req.text)
                if tool_events.splits(req):  # no call markup in a token's text: the calls follow as deltas
                    msg["text"], calls = tool_events.view(req, had)
                if req.params.get("logprobs"):
                    msg["logprobs"] = req.logprobs[start : req.generated]
            self.send_agent(addr, msg)
            for call in calls:
                self.send_agent(addr, {"id": cid, "pid": req.pid, **call})

    def to_worker(self, name: str, msg: M.Message, frames: list | None = None) -> None:
        try:
            head = P.pack(msg.encode())
            self._workers_tx.send_multipart([name.encode(), head, *(frames or [])], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            log.warning("event=worker_unreachable worker=%s op=%s errno=%s", name, msg.OP, exc.errno)
        finally:
            # A send on the synchronous shadow may consume the edge of the socket's (edge-triggered) FD
            # that announced an incoming message; reading EVENTS through the asyncio socket makes its
            # pending receive look again, or that message would wait for the next edge (seen: a chat
            # left unread until the agent timed out).
            self.workers.get(zmq.EVENTS)
