"""``/v1/completions``: a prompt continued as it is (no chat template), scheduled and preempted as chats are.

Each completion is a ``chat`` op with ``prompt`` (a text or token ids) instead of ``messages``.
Its answer takes OpenAI's legacy shapes: ``text_completion`` objects, ``logprobs`` as an
integer (the top-k size) answered in the ``tokens``/``token_logprobs``/``top_logprobs``/
``text_offset`` form, and ``echo`` (the prompt before the text).  ``suffix``, ``best_of`` above
1 and ``n`` above 1 are refused by name.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiohttp import web

from http_front.errors import HttpError
from http_front.request import LABELS, Followed, done_data, json_body, rejection, served, wants_usage
from ipc import events as E
from ipc import protocol as P
from ipc.client import AsyncClient, ClientError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
PASSED = frozenset(
    "temperature top_p seed stop n frequency_penalty presence_penalty logit_bias top_k min_p repetition_penalty"
    " nice session min_tokens response_format ignore_eos".split()
)
HTTP_ONLY = frozenset("model prompt max_tokens stream stream_options logprobs echo suffix best_of".split())
KNOWN = PASSED | LABELS | HTTP_ONLY


def completion_fields(body: dict[str, Any], models: list[str]) -> tuple[Any, dict[str, Any], bool]:
    """A completions body (a JSON object) -> (prompt, chat params, echo); what the daemon checks is left to it."""
    served(body.get("model"), models)
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise HttpError(400, f"'{unknown[0]}' is not supported here", code=P.E_UNSUPPORTED, param=unknown[0])
    if body.get("suffix"):
        raise HttpError(400, "'suffix' is not supported", code=P.E_UNSUPPORTED, param="suffix")
    if body.get("best_of") not in (None, 1):
        raise HttpError(400, "'best_of' other than 1 is not supported", code=P.E_UNSUPPORTED, param="best_of")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise HttpError(400, "one prompt per request", code=P.E_UNSUPPORTED, param="prompt")
        prompt = prompt[0]  # a batch of one
    params = {k: body[k] for k in PASSED if k in body}
    params["max_tokens"] = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    params["agent"] = body.get("user") if body.get("user") is not None else "http"
    k = body.get("logprobs")
    if k is not None:
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 20:
            raise HttpError(400, "'logprobs' is the number of top tokens, 0..20", param="logprobs")
        params |= {"logprobs": True, "top_logprobs": k}
    return prompt, params, body.get("echo") is True


def legacy_logprobs(entries: list, offset: int) -> dict[str, Any]:
    """Chat-shaped logprob entries in the completions API's form; offsets count from ``offset`` characters."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        e = e or {"token": "", "logprob": None, "top_logprobs": []}
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in e.get("top_logprobs", [])})
        out["text_offset"].append(offset)
        offset += len(e["token"])
    return out


class Completions:
    def __init__(self, client: AsyncClient, models: list[str]):
        self.client, self.models = client, models

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        prompt, params, echo = completion_fields(body, self.models)
        client, stream = self.client, body.get("stream") is True
        async with await Followed.submit(client, request, None, stream=stream, prompt=prompt, **params) as run:
            try:
                shown = (prompt if isinstance(prompt, str) else await client.detokenize(prompt)) if echo else ""
            except ClientError as exc:
                raise HttpError.of(exc.code, exc.message) from None
            pid = run.pid
            head = {
                "id": f"cmpl-{pid}-{uuid.uuid4().hex[:12]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.models[0],
            }
            if stream:
                resp = await self._stream(request, run.events, head, shown, wants_usage(body))
                run.ended = True
                return resp
            done = done_data(await run.last())
            return web.json_response(self._whole(head, done, shown), headers={"x-quantad-pid": str(pid)})

    @staticmethod
    def _whole(head: dict[str, Any], done: E.Done, shown: str) -> dict[str, Any]:
        lp = legacy_logprobs(done.logprobs, len(shown)) if done.logprobs is not None else None
        choice = {
            "index": 0,
            "text": shown + done.text,
            "logprobs": lp,
            "finish_reason": done.finish_reason,
        }
        return {
            **head,
            "choices": [choice],
            "usage": done.usage or {},
            "quantad": {"pid": done.pid, "stats": done.stats},
        }

    async def _stream(self, request, events, head: dict[str, Any], shown: str, usage: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        offset = len(shown)

        async def chunk(text: str, finish: str | None = None, logprobs: list | None = None) -> None:
            nonlocal offset
            lp = None if logprobs is None else legacy_logprobs(logprobs, offset)
            offset += len(text)
            data = {**head, "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]}
            await resp.write(b"data: " + json.dumps(data).encode() + b"\n\n")

        if shown:
            await chunk(shown)
            offset = len(shown)
        async for ev in events:
            if isinstance(ev, E.Token) and (ev.text or ev.logprobs):
                await chunk(ev.text, logprobs=ev.logprobs)
            elif ev.terminal:
                if not isinstance(ev, E.Done):
                    await resp.write(b"data: " + json.dumps(rejection(ev).body()).encode() + b"\n\n")
                else:
                    await chunk("", ev.finish_reason)
                    if usage:
                        tail = {**head, "choices": [], "usage": ev.usage or {}}
                        await resp.write(b"data: " + json.dumps(tail).encode() + b"\n\n")
                    await resp.write(b"data: [DONE]\n\n")
                break
        await resp.write_eof()
        return resp
