"""``/v1/responses``: OpenAI's Responses API, a response's input run as a chat like any other.

Scheduled, preempted and killed like a chat; a stream sends the API's semantic events
(``response.created``, ``response.output_item.added``, ``response.output_text.delta``,
``response.function_call_arguments.delta``, ..., ``response.completed``), each with its
``sequence_number``.  With ``store`` (the default) the daemon keeps the response beside its
journal (``scheduler.response_store``): ``GET``, ``DELETE``, ``cancel``, ``input_items`` and
``previous_response_id`` read it back, per identity.  ``background`` runs it for nobody: the
request is not cancelled when the client goes, survives a daemon restart like any journaled
one, and its stream can be read again from any ``starting_after``.

A background stream's events are a function of the response's text alone, never of how the
tokens arrived: its text goes out in pieces cut after whitespace (or every ``PIECE`` characters),
and its function calls at its end.  So the events numbered after ``N`` are the same whether
they are read live, replayed from the store, or recomputed after a crash.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from http_front.chat_reply import tool_calls
from http_front.errors import HttpError
from http_front.request import Followed, done_data, json_body, rejection
from http_front.response_items import (
    bad,
    call_item,
    chat_of,
    fc_id,
    final_text,
    finish,
    flag,
    message_item,
    msg_id,
    new_id,
    output_items,
    shell,
    stored_response,
)
from ipc import events as E
from ipc import protocol as P
from ipc.client import AsyncClient, ClientError, Event

TEXT_PART = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
PIECE = 32  # a background stream's longest text delta, in characters (a word is usually one delta)


class Responses:
    def __init__(self, client: AsyncClient, models: list[str]):
        self.client, self.models = client, models

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/responses", self.create)
        app.router.add_get("/v1/responses/{rid}", self.retrieve)
        app.router.add_delete("/v1/responses/{rid}", self.delete)
        app.router.add_post("/v1/responses/{rid}/cancel", self.cancel)
        app.router.add_get("/v1/responses/{rid}/input_items", self.input_items)

    async def _op(self, request: web.Request, op: str, rid: str) -> dict[str, Any]:
        """A stored-response op for the request's identity: another's response is as absent as an unknown one."""
        fields = {"response_id": rid} | ({"on_behalf_of": request["identity"]} if "identity" in request else {})
        try:
            return await self.client.call(op, **fields)
        except ClientError as exc:
            raise HttpError.of(exc.code, exc.message) from None

    # ---- POST /v1/responses --------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        stream, store, background = (
            flag(body, "stream", False),
            flag(body, "store", True),
            flag(body, "background", False),
        )
        if background and not store:
            raise bad("'background' needs 'store' (a background response is read back by its id)", "background")
        history = await self._history(request, body.get("previous_response_id"))
        messages, params, items = chat_of(body, self.models, history)
        rid = new_id("resp")
        record = shell(rid, body, self.models[0], "queued" if background else "in_progress")
        record |= {"store": store, "background": background}
        if store:
            params["response"] = {"id": rid, "record": record, "input": [*history, *items]}
            params["background"] = background
        async with await Followed.submit(self.client, request, messages, stream=stream or background, **params) as run:
            headers = {"x-quantad-pid": str(run.pid)}
            if background:  # it runs for nobody now: this connection's going does not cancel it
                run.let_go()
                if not stream:
                    return web.json_response(record, headers=headers)
                return await self._follow(request, run.pid, record, -1)
            if stream:
                live = Stream(request, record, headers)
                run.ended = await live.run(run.events)
                return live.resp
            return web.json_response(finish(record, done_data(await run.last())), headers=headers)

    async def _history(self, request: web.Request, prev: Any) -> list[dict[str, Any]]:
        """The items a ``previous_response_id`` continues: its input (its own history included) and its output."""
        if prev is None:
            return []
        if not isinstance(prev, str):
            raise bad("'previous_response_id' must be a string", "previous_response_id")
        try:
            view = await self._op(request, P.OP_RESPONSE_GET, prev)
        except HttpError as exc:
            exc.param = "previous_response_id"
            raise
        if view["final"] is None:
            raise bad(f"response {prev!r} is still in progress", "previous_response_id")
        return [*view["input"], *output_items(prev, E.decode(view["final"]))]

    # ---- the stored ones -----------------------------------------------------------------------
    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/responses/{id}``; with ``stream=true`` a background one's events after ``starting_after``."""
        view = await self._op(request, P.OP_RESPONSE_GET, request.match_info["rid"])
        if request.query.get("stream", "false").lower() != "true":
            return web.json_response(stored_response(view))
        if not view["background"]:
            raise bad("only a background response can be streamed again", "stream")
        try:
            after = int(request.query.get("starting_after", "-1"))
        except ValueError:
            raise bad("'starting_after' must be an integer", "starting_after") from None
        if after < -1:
            raise bad("'starting_after' must be -1 or more", "starting_after")
        if view["final"] is not None:
            return await self._replay(request, view, after)
        return await self._follow(request, view["pid"], view["record"], after)

    @staticmethod
    async def _replay(request: web.Request, view: dict[str, Any], after: int) -> web.StreamResponse:
        """A background response that has ended: its stream rebuilt from its stored end."""
        return await Stream(request, view["record"], after=after, canonical=True).replay(E.decode(view["final"]))

    async def _follow(self, request: web.Request, pid: int, record: dict[str, Any], after: int) -> web.StreamResponse:
        """A background response's events from ``after`` on, as its request streams (never cancelled from here)."""
        fields = {"on_behalf_of": request["identity"]} if "identity" in request else {}
        cid = await self.client.attach(pid, 0, 0, **fields)
        events = self.client.events(cid)
        try:
            first = await anext(events)
            if not isinstance(first, E.Attached) or first.state == "ENDED":  # ended meanwhile: as stored
                view = await self._op(request, P.OP_RESPONSE_GET, record["id"])
                if view["final"] is None:
                    raise rejection(first)
                return await self._replay(request, view, after)
            live = Stream(request, record, {"x-quantad-pid": str(pid)}, after=after, canonical=True)
            await live.run(events)
            return live.sent()
        finally:
            await events.aclose()

    async def delete(self, request: web.Request) -> web.Response:
        done = await self._op(request, P.OP_RESPONSE_DELETE, request.match_info["rid"])
        return web.json_response({"id": done["id"], "object": "response", "deleted": True})

    async def cancel(self, request: web.Request) -> web.Response:
        view = await self._op(request, P.OP_RESPONSE_CANCEL, request.match_info["rid"])
        return web.json_response(stored_response(view))

    async def input_items(self, request: web.Request) -> web.Response:
        """The items a stored response was run on, ``order`` desc (the default) or asc, ``limit`` after ``after``."""
        view = await self._op(request, P.OP_RESPONSE_GET, request.match_info["rid"])
        q = request.query
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad("'order' must be 'asc' or 'desc'", "order")
        try:
            limit = int(q.get("limit", "20"))
        except ValueError:
            raise bad("'limit' must be an integer", "limit") from None
        if not 1 <= limit <= 100:
            raise bad("'limit' must be 1..100", "limit")
        items = view["input"] if order == "asc" else view["input"][::-1]
        if "after" in q:
            ids = [item.get("id") for item in items]
            if q["after"] not in ids:
                raise bad(f"no input item {q['after']!r} in this response", "after")
            items = items[ids.index(q["after"]) + 1 :]
        page = items[:limit]
        first, last = (page[0]["id"], page[-1]["id"]) if page else (None, None)
        data = {"object": "list", "data": page, "first_id": first, "last_id": last, "has_more": len(items) > limit}
        return web.json_response(data)


class Pieces:
    """Text cut where it will be cut whatever the chunks it arrives in: after whitespace, or every ``PIECE`` chars."""

    def __init__(self) -> None:
        self.held = ""

    def feed(self, text: str) -> list[str]:
        out = []
        for ch in text:
            if self.held and ((self.held[-1].isspace() and not ch.isspace()) or len(self.held) >= PIECE):
                out.append(self.held)
                self.held = ""
            self.held += ch
        return out

    def flush(self) -> list[str]:
        out, self.held = [self.held] if self.held else [], ""
        return out


class Stream:
    """One response's events: its output items as they open, their deltas, and their ends.

    ``canonical``: a background response's, whose events depend on its text alone (see the module);
    ``after``: events numbered up to it are counted, not sent (a client resuming from there).
    """

    def __init__(
        self,
        request: web.Request,
        response: dict[str, Any],
        headers: dict[str, str] | None = None,
        after: int = -1,
        canonical: bool = False,
    ):
        self.request, self.response, self.after = request, response, after
        self.resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **(headers or {})}
        )
        self.seq = itertools.count()
        self.last = -1  # the number of the last event
        self.pieces = Pieces() if canonical else None
        self.opened = 0  # output items so far
        self.msg_id, self.text_at, self.text = msg_id(response["id"]), None, ""  # text: what went out as deltas
        self.fed = ""  # the text given so far (a background stream holds back its last piece)
        self.calls: dict[int, tuple[int, dict[str, Any]]] = {}  # a call's index -> (output index, its item)

    async def send(self, kind: str, **fields: Any) -> None:
        self.last = next(self.seq)
        if self.last <= self.after:
            return
        if not self.resp.prepared:
            await self.resp.prepare(self.request)
        data = {"type": kind, "sequence_number": self.last, **fields}
        await self.resp.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())

    async def _begin(self) -> None:
        await self.send("response.created", response=self.response)
        await self.send("response.in_progress", response=self.response | {"status": "in_progress"})

    async def run(self, events: AsyncIterator[Event]) -> bool:
        """Follow ``events`` to the request's end; whether it got there (False: the client hung up)."""
        try:
            await self._begin()
            async for ev in events:
                if isinstance(ev, E.Token) and ev.text:
                    await self._text(ev.text)
                elif isinstance(ev, E.ToolCall) and self.pieces is None:
                    await self._call(ev.tool_call)
                elif ev.terminal:
                    await self._end(ev)
                    return True
        except ConnectionError:  # the client hung up between two writes
            pass
        return False

    async def replay(self, final: E.Event) -> web.StreamResponse:
        """A response that has ended, from its stored end: the same events its live stream had."""
        await self._begin()
        await self._text(final_text(final))
        await self._end(final)
        return self.sent()

    def sent(self) -> web.StreamResponse:
        """The response, once it has sent something: a ``starting_after`` past every event is a 400."""
        if not self.resp.prepared:
            raise bad(f"'starting_after' {self.after} is at or past the last event ({self.last})", "starting_after")
        return self.resp

    async def _text(self, delta: str) -> None:
        self.fed += delta
        for piece in [delta] if self.pieces is None else self.pieces.feed(delta):
            await self._delta(piece)

    async def _delta(self, piece: str) -> None:
        if not piece:
            return
        if self.text_at is None:
            self.text_at, self.opened = self.opened, self.opened + 1
            item = message_item("", self.msg_id, "in_progress")
            await self.send("response.output_item.added", output_index=self.text_at, item=item)
            await self.send(
                "response.content_part.added",
                item_id=self.msg_id,
                output_index=self.text_at,
                content_index=0,
                part=TEXT_PART,
            )
        self.text += piece
        await self.send(
            "response.output_text.delta",
            item_id=self.msg_id,
            output_index=self.text_at,
            content_index=0,
            delta=piece,
            logprobs=[],
        )

    async def _call(self, delta: dict[str, Any]) -> None:
        k, fn = delta.get("index", 0), delta.get("function") or {}
        if k not in self.calls:
            call = {"id": delta.get("id", ""), "function": {"name": fn.get("name", ""), "arguments": ""}}
            self.calls[k] = (self.opened, call_item(call, fc_id(self.response["id"], k), "in_progress"))
            self.opened += 1
            await self.send("response.output_item.added", output_index=self.calls[k][0], item=self.calls[k][1])
        at, item = self.calls[k]
        piece = fn.get("arguments") or ""
        if piece:
            item["arguments"] += piece
            await self.send("response.function_call_arguments.delta", item_id=item["id"], output_index=at, delta=piece)

    async def _end(self, ev: Event) -> None:
        content = final_text(ev)
        if content.startswith(self.fed):
            await self._text(content[len(self.fed) :])
        else:  # the content was not what streamed (it should be): its held-back tail at least
            await self._text(getattr(ev, "content_tail", None) or "")
        for piece in self.pieces.flush() if self.pieces is not None else []:
            await self._delta(piece)
        final = finish(self.response, ev)
        if self.text_at is not None:
            part = TEXT_PART | {"text": self.text}
            at, mid = self.text_at, self.msg_id
            status = "completed" if isinstance(ev, E.Done) else "incomplete"
            await self.send(
                "response.output_text.done", item_id=mid, output_index=at, content_index=0, text=self.text, logprobs=[]
            )
            await self.send("response.content_part.done", item_id=mid, output_index=at, content_index=0, part=part)
            await self.send("response.output_item.done", output_index=at, item=message_item(self.text, mid, status))
        if isinstance(ev, E.Done):  # calls the stream did not show as they went (a background one shows none)
            for k, call in enumerate(tool_calls(ev)):
                if k not in self.calls:
                    await self._call({"index": k, "id": call["id"], "function": call["function"]})
        for at, item in sorted(self.calls.values(), key=lambda c: c[0]):  # in the order they were opened
            await self.send(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=at,
                arguments=item["arguments"],
            )
            await self.send("response.output_item.done", output_index=at, item=item | {"status": "completed"})
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(final["status"])
        await self.send(kind or "response.failed", response=final)
        if self.resp.prepared:
            await self.resp.write_eof()
