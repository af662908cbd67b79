"""``POST /v1/responses``: OpenAI's Responses API, a response's input run as a chat like any other.

Scheduled, preempted and killed like a chat; a stream sends the API's semantic events
(``response.created``, ``response.output_item.added``, ``response.output_text.delta``,
``response.function_call_arguments.delta``, ..., ``response.completed``), each with its
``sequence_number``.  This first cut keeps no response: ``store`` is accepted and answered
``false``, and ``previous_response_id`` and ``background`` are refused by name.
"""

from __future__ import annotations

import itertools
import json
import uuid
from typing import Any

from aiohttp import web

from http_front.errors import HttpError, error_of
from http_front.request import done_data, json_body, last_event, rejection
from http_front.response_items import call_item, chat_of, finish, message_item, new_id, shell
from ipc import events as E
from ipc.client import AsyncClient, ClientError, Event

TEXT_PART = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}


class Responses:
    def __init__(self, client: AsyncClient, models: list[str]):
        self.client, self.models = client, models

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        messages, params = chat_of(body, self.models)
        if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
            raise HttpError(400, "'stream' must be a boolean", param="stream")
        stream = body.get("stream") is True
        if "identity" in request:  # the daemon takes it from its admin (the front) only
            params["on_behalf_of"] = request["identity"]
        try:
            cid = await self.client.submit(messages, stream=stream, **params)
        except ClientError as exc:
            raise HttpError.of(exc.code, exc.message) from None
        events, ended = self.client.events(cid), False
        try:
            first = await anext(events)
            if not isinstance(first, E.Accepted):
                ended = True
                raise rejection(first)
            response = shell(f"resp_{first.pid}_{uuid.uuid4().hex[:12]}", body, self.models[0], "in_progress")
            if stream:
                resp, ended = await Stream(request, response).run(events)
                return resp
            last = await last_event(first, events)
            ended = True
            answer = finish(response, done_data(last), [new_id("msg")])
            return web.json_response(answer, headers={"x-quantad-pid": str(first.pid)})
        finally:
            if not ended:  # the HTTP client hung up (or we failed): the request must not run on for nobody
                await self.client.cancel(cid)
            await events.aclose()


class Stream:
    """One streamed response: its output items as they open, their deltas, and their ends."""

    def __init__(self, request: web.Request, response: dict[str, Any]):
        self.request, self.response = request, response
        self.resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        self.seq = itertools.count()
        self.opened = 0  # output items so far
        self.msg_id, self.text_at, self.text = new_id("msg"), None, ""
        self.calls: dict[int, tuple[int, dict[str, Any]]] = {}  # a call's index -> (output index, its item)

    async def send(self, kind: str, **fields: Any) -> None:
        data = {"type": kind, "sequence_number": next(self.seq), **fields}
        await self.resp.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())

    async def run(self, events) -> tuple[web.StreamResponse, bool]:
        await self.resp.prepare(self.request)
        await self.send("response.created", response=self.response)
        await self.send("response.in_progress", response=self.response)
        try:
            async for ev in events:
                if isinstance(ev, E.Token) and ev.text:
                    await self._text(ev.text)
                elif isinstance(ev, E.ToolCall):
                    await self._call(ev.tool_call)
                elif ev.terminal:
                    await self._end(ev)
                    return self.resp, True
        except ConnectionError:  # the client hung up between two writes
            pass
        return self.resp, False

    async def _text(self, delta: str) -> None:
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
        self.text += delta
        await self.send(
            "response.output_text.delta",
            item_id=self.msg_id,
            output_index=self.text_at,
            content_index=0,
            delta=delta,
            logprobs=[],
        )

    async def _call(self, delta: dict[str, Any]) -> None:
        k, fn = delta.get("index", 0), delta.get("function") or {}
        if k not in self.calls:
            call = {"id": delta.get("id", ""), "function": {"name": fn.get("name", ""), "arguments": ""}}
            self.calls[k] = (self.opened, call_item(call, new_id("fc"), "in_progress"))
            self.opened += 1
            await self.send("response.output_item.added", output_index=self.calls[k][0], item=self.calls[k][1])
        at, item = self.calls[k]
        piece = fn.get("arguments") or ""
        if piece:
            item["arguments"] += piece
            await self.send("response.function_call_arguments.delta", item_id=item["id"], output_index=at, delta=piece)

    async def _end(self, ev: Event) -> None:
        if not isinstance(ev, E.Done):
            err = error_of(ev)
            failed = self.response | {"status": "failed", "error": {"code": err.code, "message": err.message}}
            await self.send("response.failed", response=failed)
            await self.resp.write_eof()
            return
        if ev.content_tail:
            await self._text(ev.content_tail)
        if self.text_at is not None:
            part = TEXT_PART | {"text": self.text}
            at, mid = self.text_at, self.msg_id
            await self.send(
                "response.output_text.done", item_id=mid, output_index=at, content_index=0, text=self.text, logprobs=[]
            )
            await self.send("response.content_part.done", item_id=mid, output_index=at, content_index=0, part=part)
            await self.send("response.output_item.done", output_index=at, item=message_item(self.text, mid))
        calls = sorted(self.calls.values(), key=lambda c: c[0])  # in the order they were opened
        for at, item in calls:
            await self.send(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=at,
                arguments=item["arguments"],
            )
            await self.send("response.output_item.done", output_index=at, item=item | {"status": "completed"})
        ids = [self.msg_id] + [item["id"] for _, item in calls]
        final = finish(self.response, ev, ids)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        await self.send(kind, response=final)
        await self.resp.write_eof()
