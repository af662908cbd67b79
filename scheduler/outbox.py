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

from ipc import events as E
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
        self.send_agent(addr, E.Reply(id=cid, answer=data))

    def error(self, addr: bytes, cid: Any, code: str, message: str) -> None:
        self.send_agent(addr, E.Error(id=cid, code=code, message=message))

    def send_agent(self, addr: bytes, ev: E.Event) -> bool:
        return self._send(addr, ev.encode())

    def _send(self, addr: bytes, msg: dict) -> bool:
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

    def emit(self, req: Request, ev: E.Event) -> None:
        """``ev`` to everyone following ``req``, each under its own id (a streamed kind only to those that stream)."""
        msg = ev.encode()
        for (addr, cid), w in list(req.watchers.items()):
            if w.stream or not ev.STREAMED:
                self._send(addr, msg | {"id": cid})

    def emit_tokens(self, req: Request) -> None:
        """To each streaming follower of ``req``, the tokens it has not had yet (and the tool-call deltas in them)."""
        wants_logprobs = req.params.logprobs
        for (addr, cid), w in list(req.watchers.items()):
            start, had, out = w.tokens, w.chars, req.unsent(w) if w.stream else None
            if out is None:  # not streaming, or recomputed after a restart: it has these already
                continue
            (text, ids), calls = out, []
            if tool_events.splits(req):  # no call markup in a token's text: the calls follow as deltas
                text, calls = tool_events.view(req, had)
            logprobs = req.logprobs[start : req.generated] if wants_logprobs else None
            token = E.Token(
                id=cid,
                pid=req.pid,
                text=text,
                token_ids=ids,
                index=req.generated,
                chars=len(req.text),
                logprobs=logprobs,
            )
            self.send_agent(addr, token)
            for call in calls:
                self.send_agent(addr, E.ToolCall(id=cid, pid=req.pid, tool_call=call))

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
