"""What every HTTP route of the front reads the same way: the JSON body, the model it names, the request's events.

``chat``, ``completions``, ``n`` choices and the tokenizer routes all take a JSON object, answer
404 ``model_not_found`` for a model not served here, read ``stream_options.include_usage``, and
follow a submitted request to its terminal event; each does it here once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiohttp import web

from http_front.errors import HttpError, error_of
from ipc import events as E
from ipc import protocol as P
from ipc.client import AsyncClient, ClientError, Event


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's body, which must be a JSON object (400 otherwise)."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise HttpError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    return body


def served(model: Any, models: Iterable[str]) -> None:
    """404 ``model_not_found`` unless ``model`` is one of the names the model is served under."""
    names = list(models)
    if model not in names:
        raise HttpError(
            404, f"model {model!r} is not served here; try {names[0]!r}", "not_found_error", "model_not_found", "model"
        )


# Fields that only label a request (OpenAI's, sent by SDKs and frameworks) or ask for what is always on
# (llama-server's ``cache_prompt``): accepted and not acted on, on chat and completions alike
LABELS = frozenset("store metadata service_tier user prompt_cache_key safety_identifier cache_prompt".split())


def wants_usage(body: dict[str, Any]) -> bool:
    """``stream_options.include_usage``: a stream ends with a usage chunk."""
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def rejection(ev: Event) -> HttpError:
    """The error for a request whose first event is not ``accepted`` (or whose end is not ``done``)."""
    return error_of(ev) if ev.event in P.TERMINAL_EVENTS else HttpError(500, "unexpected event")


async def last_event(first: Event, events: AsyncIterator[Event]) -> Event:
    """Follow a request to its terminal event (``first`` if it was the only one)."""
    last = first
    async for ev in events:
        last = ev
    return last


def done_data(last: Event) -> E.Done:
    """A request's terminal event: its ``done``, or its error raised."""
    if not isinstance(last, E.Done):
        raise rejection(last)
    return last


def stream_position(seen: list[int], ev: Event) -> list[int]:
    """Tokens and raw characters (tools: more than shown) a stream has had after token event ``ev``."""
    if not isinstance(ev, E.Token):
        return seen
    return [ev.index or seen[0], ev.chars if ev.chars is not None else seen[1] + len(ev.text)]


def sse_id(pid: Any, seen: list[int]) -> bytes:
    """The SSE ``id`` line of a chunk: ``PID.TOKENS.CHARS``, what a client that lost the stream resumes from."""
    return f"id: {pid}.{seen[0]}.{seen[1]}\n".encode()


def for_caller(request: web.Request, params: dict[str, Any]) -> dict[str, Any]:
    """PARAMS as the daemon takes them from this HTTP request: on behalf of its bearer token's identity (the
    daemon takes that from its admin, the front, only), at its inference objective's nice unless the body
    set one."""
    if "identity" in request:
        params["on_behalf_of"] = request["identity"]
    if params.get("nice") is None and "nice" in request:
        params["nice"] = request["nice"]
    return params


class Followed:
    """A request a route submitted and follows: its ``accepted``, its events, and its cancel if the route
    leaves before its end (the HTTP client hung up, or the route failed), so it never runs on for nobody.

    ``async with await Followed.submit(...) as run``: inside, ``run.first`` is its ``accepted``; a
    route that reads the events to the end (``last()``, or a stream that got there) marks it ``ended``,
    and one that lets it run on (a background response) calls ``let_go()``.
    """

    def __init__(self, client: AsyncClient, cid: Any):
        self.client, self.cid, self.events = client, cid, client.events(cid)
        self.ended = False
        self.first: E.Accepted | None = None

    @classmethod
    async def submit(cls, client: AsyncClient, request: web.Request, messages: list | None, **params: Any) -> Followed:
        """Submit for the HTTP request's caller (``for_caller``)."""
        try:
            return cls(client, await client.submit(messages, **for_caller(request, params)))
        except ClientError as exc:  # too large for a frame, or not encodable
            raise HttpError.of(exc.code, exc.message) from None

    async def __aenter__(self) -> Followed:
        first = await anext(self.events)
        if not isinstance(first, E.Accepted):  # rejected: the only event there is
            await self.events.aclose()
            raise rejection(first)
        self.first = first
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.ended:
            await self.client.cancel(self.cid)
        await self.events.aclose()

    @property
    def pid(self) -> int:
        return self.first.pid if self.first is not None else 0

    async def last(self) -> Event:
        """Its terminal event (read to the end: nothing to cancel then)."""
        last = await last_event(self.first, self.events)
        self.ended = True
        return last

    def let_go(self) -> None:
        self.ended = True
