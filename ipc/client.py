"""Agent-side clients: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

``chat()`` is shaped like the OpenAI chat API: messages in; a stream of events or one
final ``ChatResult`` out.  One DEALER socket per client; each request carries an id the
client chooses, so many requests can be in flight on one socket.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from ipc import credentials
from ipc import events as E
from ipc import protocol as P
from ipc.endpoints import agent_endpoint
from ipc.events import Event
from ipc.resume import OpenChats

Messages = str | list[dict[str, str]]


class ClientError(Exception):
    """An ``error`` reply from the daemon (``code`` is one of the protocol's ``E_*``)."""

    def __init__(self, code: str, message: str, text: str = ""):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.text = code, message, text


class DaemonGone(TimeoutError):
    """The daemon answered nothing, not even a ping, for ``dead_after_s``: it died or is unreachable."""


PROBE_S = 1.0  # silence before a client asks after its chats (an attach each: the answer proves the daemon is up)


def probe_period(dead_after_s: float, chats: OpenChats) -> float:
    """Silence before the next probe; a quarter of it while a chat was handed over (its next daemon is due)."""
    return min(PROBE_S, dead_after_s / 4) / (4 if chats.waiting else 1)


def dead_after_default() -> float:
    """``$QUANTAD_DEAD_AFTER_S``, else 30 s: how long a client that waits without a timeout waits for a dead daemon."""
    try:
        return max(0.5, float(os.environ.get("QUANTAD_DEAD_AFTER_S", "30")))
    except ValueError:
        return 30.0


class Cancelled(ClientError):
    def __init__(self, message: str, text: str = ""):
        super().__init__(P.EV_CANCELLED, message, text)


@dataclass
class ChatResult:
    text: str
    finish_reason: str
    usage: dict[str, int]
    stats: dict[str, Any]
    pid: int
    events: list[Event] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI-shaped, parsed by the worker
    content: str | None = None  # the text without tool-call markup (None when it was all calls)

    @property
    def token_ids(self) -> list[int]:
        return [t for ev in self.events if isinstance(ev, E.Token) for t in ev.token_ids]

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "stats": self.stats,
            "content": self.content,
            "tool_calls": self.tool_calls,
        }


def chat_message(cid: Any, messages: Messages | None, **params: Any) -> dict[str, Any]:
    """A ``chat`` op; ``messages`` None for a completion (``prompt`` in ``params``)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    msg = {"op": P.OP_CHAT, "id": cid, **({} if messages is None else {"messages": messages})}
    msg.update({k: v for k, v in params.items() if v is not None})
    return msg


def _tokenize_fields(prompt: str | None, messages: Messages | None, fields: dict[str, Any]) -> dict[str, Any]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return {k: v for k, v in {"prompt": prompt, "messages": messages, **fields}.items() if v is not None}


def result_of(events: list[Event]) -> ChatResult:
    """Turn a finished event list into a result, or raise the terminal error."""
    last = events[-1]
    if isinstance(last, E.Cancelled):
        raise Cancelled(last.message or "cancelled", last.text)
    if isinstance(last, E.Error):
        raise ClientError(last.code, last.message, last.text)
    if not isinstance(last, E.Done):
        raise ClientError(P.E_INTERNAL, f"a chat ended with a {last.event!r} event")
    return ChatResult(last.text, last.finish_reason, last.usage, last.stats, last.pid, events, last.tool_calls or [],
                      last.content)  # fmt: skip


def reply_data(ev: Event) -> dict[str, Any]:
    """The answer of a reply, or the ``ClientError`` of an error."""
    if isinstance(ev, E.Error):
        raise ClientError(ev.code, ev.message)
    return ev.answer if isinstance(ev, E.Reply) else {}


def frame_of(msg: dict[str, Any]) -> bytes:
    """Pack a message, refusing here what the daemon cannot take.

    A frame over ``MAX_FRAME`` would make ZeroMQ drop the whole connection (``MAXMSGSIZE``),
    losing every request in flight on it; a value msgpack cannot encode (an int over 64 bits)
    is the caller's error too.  Both raise ``ClientError`` before anything is sent.
    """
    try:
        frame = P.pack(msg)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ClientError(P.E_BAD_FIELD, f"message cannot be encoded: {exc}") from None
    if len(frame) > P.MAX_FRAME:
        raise ClientError(P.E_TOO_LARGE, f"message of {len(frame)} bytes exceeds {P.MAX_FRAME}")
    return frame


def _dealer(ctx: zmq.Context, endpoint: str, curve: tuple[bytes, bytes, bytes] | None = None) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    # A fixed routing id: after a reconnect the daemon still routes this client's replies.
    s.setsockopt(zmq.IDENTITY, f"agent-{uuid.uuid4().hex}".encode())
    s.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME)
    if curve is None and endpoint.startswith("tcp://") and os.environ.get("QUANTAD_CURVE_KEY"):
        curve = credentials.load_client_keys(os.environ["QUANTAD_CURVE_KEY"], os.environ["QUANTAD_CURVE_SERVER"])
    if curve is not None:  # (server public, own public, own secret): the daemon knows us by our public key
        credentials.curve_client(s, *curve)
    s.connect(endpoint)
    return s


class _Ids:
    def __init__(self) -> None:
        self._n = itertools.count(1)
        self.prefix = f"{os.getpid()}-{id(self):x}-"

    def next(self) -> str:
        return f"{self.prefix}{next(self._n)}"


class Ops:
    """The ops both clients send, built once: each returns ``self.call(...)``, a reply's data from
    ``Client`` and an awaitable of it from ``AsyncClient`` (``await client.ps()``)."""

    def call(self, op: str, timeout: float | None = 5.0, **fields: Any) -> Any:
        raise NotImplementedError

    def ping(self, timeout: float | None = 5.0) -> Any:
        return self.call(P.OP_PING, timeout)

    def wait_ready(self, timeout: float | None = 300.0) -> Any:
        """Until every worker is up (the daemon answers only then)."""
        return self.call(P.OP_PING, timeout, wait=True)

    def ps(self) -> Any:
        return self.call(P.OP_PS)

    def kill(self, pid: int) -> Any:
        return self.call(P.OP_KILL, pid=pid)

    def nice(self, pid: int, nice: int) -> Any:
        """Change a live request's nice value (-20..19, lower runs first); the reply is ``{pid, nice, old}``."""
        return self.call(P.OP_NICE, pid=pid, nice=nice)

    def stats(self) -> Any:
        """Daemon-wide counters, queue length, tokens/s and listening endpoints (protocol 3.7)."""
        return self.call(P.OP_STATS)

    def workers(self) -> Any:
        """Per worker: liveness, heartbeat age, slots, device, model, memory per tier, restarts (3.8)."""
        return self.call(P.OP_WORKERS)

    def tokenize(self, prompt: str | None = None, messages: Messages | None = None, **fields: Any) -> Any:
        """``{count, tokens, max_model_len}`` of a text or of a chat as the model's template renders it (3.10).

        Asked before the first worker is up, the daemon answers once it is: waited for as long as it lives.
        """
        return self.call(P.OP_TOKENIZE, None, **_tokenize_fields(prompt, messages, fields))


class Client(Ops):
    """Blocking client.  ``timeout`` (seconds) bounds each wait for the daemon.

    With no timeout a wait may last as long as the request does, but never forever: after a
    second of silence the client asks after its open chats (``attach``; a ping when it has
    none), and when nothing at all has come for ``dead_after_s`` it raises ``DaemonGone`` (a
    ``TimeoutError``).  A daemon that restarts in that time finishes the chats from its
    journal: they stream on from where they were, nothing lost and nothing repeated.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        agent: str = "",
        timeout: float | None = None,
        curve=None,
        dead_after_s: float | None = None,
    ):
        self.endpoint = agent_endpoint(endpoint)
        self.agent = agent
        self.timeout = timeout
        self.dead_after_s = dead_after_default() if dead_after_s is None else dead_after_s
        self._ctx = zmq.Context()
        self._sock = _dealer(self._ctx, self.endpoint, curve)
        self._ids = _Ids()
        self._inbox: dict[Any, deque[dict]] = defaultdict(deque)
        self._probes: set[str] = set()  # ids of liveness pings in flight (their pongs are dropped)
        self._chats = OpenChats()  # what it takes to resume each open chat after a restart

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, msg: dict[str, Any]) -> Any:
        msg.setdefault("id", self._ids.next())
        self._sock.send(frame_of(msg))
        return msg["id"]

    def recv(self, cid: Any, timeout: float | None = ...) -> dict[str, Any]:
        """Next message for request ``cid``, as the map it came in; messages for other ids are kept for later."""
        return self.next_event(cid, timeout).data

    def next_event(self, cid: Any, timeout: float | None = ...) -> Event:
        """Next event for request ``cid``; events for other ids are kept for later."""
        timeout = self.timeout if timeout is ... else timeout
        heard = time.monotonic()
        while not self._inbox[cid]:
            slice_s = timeout if timeout is not None else probe_period(self.dead_after_s, self._chats)
            if not self._sock.poll(int(slice_s * 1000)):
                if timeout is not None:
                    raise TimeoutError(f"no answer from the daemon at {self.endpoint} within {timeout} s")
                if time.monotonic() - heard >= self.dead_after_s:
                    raise DaemonGone(f"the daemon at {self.endpoint} answered nothing for {self.dead_after_s:g} s")
                self._probe()
                continue
            ev = E.decode(P.unpack(self._sock.recv(), header="event"))
            heard = time.monotonic()
            if ev.id in self._probes:
                self._probes.discard(ev.id)
                continue
            deliver, again = self._chats.take(ev, wait=self.timeout is None)
            if again is not None:  # a chat no daemon acknowledged: sent again
                self._sock.send(frame_of(again))
            if deliver:
                self._inbox[ev.id].append(ev)
        ev = self._inbox[cid].popleft()
        if not self._inbox[cid]:
            del self._inbox[cid]
        return ev

    def _probe(self) -> None:
        """Silence: is the daemon still there (or back)?  Its answers to these say so."""
        for msg in self._chats.probes():
            self._sock.send(frame_of(msg))
        if not self._probes and not self._chats.open:
            self._probes.add(self.send({"op": P.OP_PING}))

    def call(self, op: str, timeout: float | None = 5.0, **fields: Any) -> dict[str, Any]:
        cid = self.send({"op": op, **fields})
        return reply_data(self.next_event(cid, timeout))

    def detokenize(self, tokens: list[int]) -> str:
        return self.call(P.OP_DETOKENIZE, None, tokens=list(tokens))["prompt"]

    def submit(self, messages: Messages, **params: Any) -> Any:
        """Send a chat and return its id; read its events with ``events(id)``."""
        params.setdefault("agent", self.agent or None)
        msg = chat_message(self._ids.next(), messages, **params)
        self._chats.track(msg)
        return self.send(msg)

    def attach(self, pid: int, stream: bool = True) -> Iterator[Event]:
        """Follow request ``pid`` (one of the caller's, or any for an admin) from its start: its events to the end."""
        cid = self._ids.next()
        self._chats.track({"id": cid, "stream": stream})
        self._chats.open[cid].pid = pid
        self.send(self._chats.open[cid].attach())
        return self.events(cid)

    def events(self, cid: Any) -> Iterator[Event]:
        while True:
            ev = self.next_event(cid)
            yield ev
            if ev.terminal:
                return

    def chat(self, messages: Messages, *, stream: bool = False, **params: Any) -> ChatResult | Iterator[Event]:
        """``stream=True``: an iterator of events; else the final ``ChatResult`` (raises ``ClientError``)."""
        cid = self.submit(messages, stream=True, **params)
        it = self.events(cid)
        return it if stream else result_of(list(it))

    def complete(self, prompt: str | list[int], **params: Any) -> ChatResult | Iterator[Event]:
        """A completion: ``prompt`` (text or token ids) continued as it is, without the chat template."""
        return self.chat(None, prompt=prompt, **params)


class AsyncClient(Ops):
    """asyncio client: one long-lived receive task routes replies to per-request queues.

    Waits without a timeout end in ``DaemonGone`` as ``Client``'s do (``dead_after_s``), and open
    chats resume after a daemon restart as theirs do (``resume=False``: they end with the daemon).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        agent: str = "",
        timeout: float | None = None,
        curve=None,
        dead_after_s: float | None = None,
        resume: bool = True,
    ):
        self.endpoint = agent_endpoint(endpoint)
        self.agent = agent
        self.timeout = timeout
        self.dead_after_s = dead_after_default() if dead_after_s is None else dead_after_s
        self._heard = 0.0  # when the daemon last sent anything
        self._probed = 0.0  # when the last probe went out
        self._ctx = zmq.asyncio.Context()
        self._sock = _dealer(self._ctx, self.endpoint, curve)
        self._ids = _Ids()
        self._queues: dict[Any, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._chats = OpenChats(resume)  # what it takes to resume each open chat after a restart

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._sock.close(0)
        self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read(self) -> None:
        while True:
            frame = await self._sock.recv()
            self._heard = time.monotonic()
            try:
                ev = E.decode(P.unpack(frame, header="event"))
            except P.ProtocolError as exc:  # one bad frame must not strand every pending request
                logging.getLogger("quantad.client").error("undecodable reply: %s", exc.message)
                continue
            deliver, again = self._chats.take(ev, wait=self.timeout is None)
            if again is not None:  # a chat no daemon acknowledged: sent again
                await self._sock.send(frame_of(again))
            q = self._queues.get(ev.id)
            if q is not None and deliver:
                q.put_nowait(ev)

    async def _send(self, msg: dict[str, Any]) -> asyncio.Queue:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        msg.setdefault("id", self._ids.next())
        frame = frame_of(msg)
        q = self._queues[msg["id"]] = asyncio.Queue()
        await self._sock.send(frame)
        return q

    async def _get(self, q: asyncio.Queue, timeout: float | None) -> Event:
        if timeout is None:
            return await self._get_watching(q)
        try:
            return await asyncio.wait_for(q.get(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no answer from the daemon at {self.endpoint} within {timeout} s") from None

    async def _get_watching(self, q: asyncio.Queue) -> Event:
        """Wait as long as it takes while the daemon is alive: a ping through silence, ``DaemonGone`` after none."""
        start = time.monotonic()
        while True:
            period = probe_period(self.dead_after_s, self._chats)
            try:
                return await asyncio.wait_for(q.get(), period)
            except TimeoutError:
                now = time.monotonic()
                if now - max(self._heard, start) >= self.dead_after_s:
                    raise DaemonGone(
                        f"the daemon at {self.endpoint} answered nothing for {self.dead_after_s:g} s"
                    ) from None
                if now - max(self._heard, self._probed) < period:  # one probe per silence for the whole client,
                    continue  # not one per waiting chat: 64 waiters each probing 64 chats were rate_limited
                self._probed = now
                for msg in self._chats.probes():  # their answers: a sign of life, and the rest of each chat
                    await self._sock.send(frame_of(msg))
                if not self._chats.open:
                    await self._sock.send(frame_of({"op": P.OP_PING, "id": self._ids.next()}))  # its pong: alive

    async def call(self, op: str, timeout: float | None = 5.0, **fields: Any) -> dict[str, Any]:
        msg = {"op": op, **fields}
        q = await self._send(msg)
        try:
            return reply_data(await self._get(q, timeout))
        finally:
            self._queues.pop(msg["id"], None)

    async def detokenize(self, tokens: list[int]) -> str:
        return (await self.call(P.OP_DETOKENIZE, None, tokens=list(tokens)))["prompt"]

    async def submit(self, messages: Messages, *, stream: bool = True, **params: Any) -> Any:
        """Send a chat and return its id; read its events with ``events(id)``, stop it with ``cancel(id)``.

        ``stream=False`` asks the daemon for no ``token``/``preempted``/``resumed`` events.
        """
        params.setdefault("agent", self.agent or None)
        msg = chat_message(self._ids.next(), messages, stream=stream, **params)
        self._chats.track(msg)
        await self._send(msg)
        return msg["id"]

    async def attach(self, pid: int, offset: int = 0, chars: int = 0, **fields: Any) -> Any:
        """Follow request ``pid`` from ``offset`` tokens / ``chars`` characters on (protocol 3.9); read ``events(id)``.

        The first event is ``attached`` (or the ``error`` ``not_found``).
        """
        msg = {"op": P.OP_ATTACH, "pid": pid, "offset": offset, "chars": chars, **fields}
        await self._send(msg)
        return msg["id"]

    def events(self, cid: Any) -> AsyncIterator[Event]:
        """The events of a chat sent with ``submit``, up to and including its terminal one."""
        return self._events(cid, self._queues[cid])

    async def cancel(self, cid: Any) -> None:
        """Cancel a chat of this client; its ``cancelled`` event (if still read) is the answer."""
        await self._sock.send(P.pack({"op": P.OP_CANCEL, "id": cid}))

    async def _events(self, cid: Any, q: asyncio.Queue) -> AsyncIterator[Event]:
        try:
            while True:
                ev = await self._get(q, self.timeout)
                yield ev
                if ev.terminal:
                    return
        finally:
            self._queues.pop(cid, None)
            self._chats.forget(cid)

    async def chat(
        self, messages: Messages, *, stream: bool = False, **params: Any
    ) -> ChatResult | AsyncIterator[Event]:
        """Like ``AsyncOpenAI``: ``await chat(...)`` gives a result, or with ``stream=True`` an async iterator."""
        params.setdefault("agent", self.agent or None)
        msg = chat_message(self._ids.next(), messages, stream=True, **params)
        self._chats.track(msg)
        q = await self._send(msg)
        it = self._events(msg["id"], q)
        if stream:
            return it
        return result_of([ev async for ev in it])
