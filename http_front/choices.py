"""``n`` choices of one HTTP chat: ``n`` chats of one ``fork`` group, so their prompt is prefilled once.

Each choice is a request of its own (listed by ``ps``, preempted, killed) with the seed
``seed + i`` when a seed was given, so every choice is reproducible; the group makes the
worker prefill the shared prompt once and copy its state into the other rows.  A stream
interleaves the choices' chunks (``choices[0].index`` says whose), each with the SSE id
``PID.TOKENS.CHARS`` of its own request (the pids in ``x-quantad-pid``, in choice order): a
client that lost the stream after a daemon restart resumes each choice from its last id with
``GET /v1/quantad/requests/PID/stream?index=I``, as it resumes a single chat.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

from http_front.chat_reply import completion
from http_front.errors import HttpError, error_of
from http_front.request import done_data, last_event, rejection, sse_id, stream_position
from ipc import events as E
from ipc import protocol as P
from ipc.client import AsyncClient, ClientError

MAX_N = 8


def choice_index(request: web.Request) -> int:
    """``?index=I`` of a resumed stream: which of ``n`` choices its chunks are (0 by default)."""
    raw = request.query.get("index", "0")
    if not raw.isdigit() or int(raw) >= MAX_N:
        raise HttpError(400, f"'index' must be an integer in 0..{MAX_N - 1}", param="index")
    return int(raw)


def choices_of(body: dict[str, Any]) -> int:
    """``n`` (1 when absent), within 1..MAX_N."""
    n = body.get("n")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise HttpError(400, f"'n' must be an integer in 1..{MAX_N}", code=P.E_UNSUPPORTED, param="n")
    return n


class Choices:
    def __init__(
        self, client: AsyncClient, model: str, request: web.Request, messages: list, params: dict[str, Any], n: int
    ):
        self.client, self.model, self.request, self.n = client, model, request, n
        group = uuid.uuid4().hex
        seed = params.get("seed")
        self.params = [params | {"fork": group, **({"seed": seed + i} if seed is not None else {})} for i in range(n)]
        self.messages = messages
        self.cids: list[Any] = []

    async def respond(self, stream: bool, usage: bool) -> web.StreamResponse:
        client = self.client
        try:
            for p in self.params:
                self.cids.append(await client.submit(self.messages, stream=stream, **p))
        except ClientError as exc:
            await self._cancel()
            raise HttpError.of(exc.code, exc.message) from None
        streams = [client.events(cid) for cid in self.cids]
        try:
            firsts = [await anext(s) for s in streams]
            bad = next((ev for ev in firsts if not isinstance(ev, E.Accepted)), None)
            if bad is not None:
                raise rejection(bad)
            head = {
                "id": f"chatcmpl-{firsts[0].pid}-{uuid.uuid4().hex[:12]}",
                "created": int(time.time()),
                "model": self.model,
            }
            pids = ",".join(str(ev.pid) for ev in firsts)
            if stream:
                return await self._stream(streams, head, usage, pids)
            dones = [done_data(await last_event(first, s)) for first, s in zip(firsts, streams, strict=True)]
            return web.json_response(self._whole(head, dones), headers={"x-quantad-pid": pids})
        finally:
            await self._cancel()
            for s in streams:
                await s.aclose()

    async def _cancel(self) -> None:
        for cid in self.cids:  # those already ended ignore it
            await self.client.cancel(cid)

    @staticmethod
    def _usage(dones: list[E.Done]) -> dict[str, int]:
        """The choices' usage together: the prompt once (it was computed once), every choice's completion."""
        prompt = dones[0].usage.get("prompt_tokens", 0)
        out = sum(d.usage.get("completion_tokens", 0) for d in dones)
        details = dones[0].usage.get("prompt_tokens_details") or {"cached_tokens": 0}
        return {
            "prompt_tokens": prompt,
            "completion_tokens": out,
            "total_tokens": prompt + out,
            "prompt_tokens_details": details,
        }

    def _whole(self, head: dict[str, Any], dones: list[E.Done]) -> dict[str, Any]:
        one = [completion(head, d)["choices"][0] for d in dones]
        return {
            **head,
            "object": "chat.completion",
            "system_fingerprint": None,
            "choices": [c | {"index": i} for i, c in enumerate(one)],
            "usage": self._usage(dones),
            "quantad": {"pids": [d.pid for d in dones], "stats": [d.stats for d in dones]},
        }

    async def _stream(self, streams, head: dict[str, Any], usage: bool, pids: str) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "x-quantad-pid": pids}
        )
        await resp.prepare(self.request)
        head = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, events) -> None:
            async for ev in events:
                await queue.put((i, ev))
            await queue.put((i, None))

        pid_of = pids.split(",")
        seen = [[0, 0] for _ in range(self.n)]  # each choice's tokens and characters so far: its SSE id

        async def chunk(i: int, delta: dict, finish: str | None = None, logprobs: list | None = None) -> None:
            lp = None if logprobs is None else {"content": logprobs, "refusal": None}
            data = {**head, "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": lp}]}
            await resp.write(sse_id(pid_of[i], seen[i]) + b"data: " + json.dumps(data).encode() + b"\n\n")

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        done: list[E.Done] = []
        try:
            for i in range(self.n):
                await chunk(i, {"role": "assistant", "content": ""})
            open_ = self.n
            while open_:
                i, ev = await queue.get()
                if ev is None:
                    open_ -= 1
                elif isinstance(ev, E.Token):
                    seen[i] = stream_position(seen[i], ev)
                    if ev.text or ev.logprobs:
                        await chunk(i, {"content": ev.text}, logprobs=ev.logprobs)
                elif isinstance(ev, E.ToolCall):
                    await chunk(i, {"tool_calls": [ev.tool_call]})
                elif isinstance(ev, E.Done):
                    done.append(ev)
                    if ev.content_tail:
                        await chunk(i, {"content": ev.content_tail})
                    await chunk(i, {}, ev.finish_reason)
                elif ev.terminal:
                    await resp.write(b"data: " + json.dumps(error_of(ev).body()).encode() + b"\n\n")
            if usage and done:
                tail = {**head, "choices": [], "usage": self._usage(done)}
                await resp.write(b"data: " + json.dumps(tail).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        finally:
            for t in tasks:
                t.cancel()
        return resp
