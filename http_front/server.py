"""OpenAI-compatible HTTP front: ``/v1/chat/completions`` (SSE or not), ``/v1/models``, ``/health``.

It is an ``ipc.client.AsyncClient`` of the daemon's own agent socket, not a second way into the
scheduler.  An HTTP chat is then a syscall like any other by construction: validated by the same
``parse_chat``, listed by ``ps``, preempted, killed, drained, with every error code the protocol
has; the daemon keeps one code path.  The price is one local ZeroMQ hop per event, microseconds
against a token's milliseconds.  aiohttp's server runs inside the daemon's asyncio loop without
taking over its signals (``handle_signals=False``); ``handler_cancellation`` turns an HTTP client
that hangs up into a ``cancel`` of its request, as a vanished agent is.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

from http_front import tokens as http_tokens
from http_front.chat_reply import CUT_GRAMMAR, chat_fields, completion, tool_calls
from http_front.choices import Choices, choice_index, choices_of
from http_front.completions import Completions
from http_front.errors import HttpError, error_of
from http_front.request import (
    Followed,
    done_data,
    for_caller,
    json_body,
    rejection,
    served,
    sse_id,
    stream_position,
    wants_usage,
)
from http_front.responses import Responses
from ipc import events as E
from ipc import protocol as P
from ipc.client import AsyncClient, ClientError, Event

log = logging.getLogger("quantad")

DEFAULT_AGENT = "http"
SHUTDOWN_S = 2.0  # after the drain, how long in-flight responses may take to flush
# The Gateway API Inference Extension's header naming a request's InferenceObjective (its gateway forwards it).
OBJECTIVE_HEADER = "x-gateway-inference-objective"


# ---- the server -----------------------------------------------------------------------------
class HttpFront:
    def __init__(
        self,
        endpoint: str,
        host: str,
        port: int,
        models: Iterable[str],
        token: dict[str, str] | None = None,
        metrics: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
        objective_nice: dict[str, int] | None = None,
    ):
        self.endpoint = endpoint.replace("tcp://*:", "tcp://127.0.0.1:").replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
        self.host, self.port = host, port
        self.models = [m for m in dict.fromkeys(models) if m]  # the first is the id /v1/models shows
        self.token = token  # bearer token -> its name; None: no token asked for (requests are the front's own)
        self.metrics = metrics  # the daemon's Prometheus page, for a pool's endpoint picker on this port
        self.objective_nice = objective_nice or {}  # an inference pool's objective (by header) -> nice
        self.created = int(time.time())
        self.client: AsyncClient | None = None
        self.runner: web.AppRunner | None = None

    async def start(self) -> str:
        self.client = AsyncClient(self.endpoint, agent=DEFAULT_AGENT, resume=False)  # it dies with the daemon
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=P.MAX_FRAME)
        app.router.add_get("/health", self.health)
        if self.metrics is not None:
            app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.get_model)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/quantad/requests/{pid}/stream", self.resume)
        http_tokens.add_routes(app, self.client, self.models)
        app.router.add_post("/v1/completions", Completions(self.client, self.models).handle)
        Responses(self.client, self.models).add_routes(app)
        self.runner = web.AppRunner(
            app, handle_signals=False, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_S
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, shutdown_timeout=SHUTDOWN_S)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.client is not None:
            await self.client.close()

    # ---- middlewares ------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every failure as an OpenAI-shaped JSON error, and one log line per request."""
        t0 = time.monotonic()
        try:
            resp = await handler(request)
        except HttpError as exc:
            resp = exc.response()
        except web.HTTPException as exc:  # unknown path (404), wrong method (405), body too large (413)
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            resp = HttpError(exc.status, exc.reason, kind, code=exc.reason.lower().replace(" ", "_")).response()
        except (TimeoutError, ClientError) as exc:  # the daemon did not answer a status op
            resp = HttpError(503, f"the daemon did not answer: {exc}", "service_unavailable", retry=True).response()
        except Exception:
            log.exception("event=internal_error side=http path=%s", request.path)
            resp = HttpError(500, "internal error", "server_error", P.E_INTERNAL).response()
        log.info(
            "event=http method=%s path=%s status=%s ms=%.1f",
            request.method,
            request.path,
            resp.status,
            1000 * (time.monotonic() - t0),
        )
        return resp

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        """``/v1/*`` needs the bearer token when one is set; ``/health`` stays open for probes.  Who the
        caller is also gives its nice, when its inference objective (by header) is one ``--objective-nice`` names."""
        if self.token is not None and (request.path.startswith("/v1/") or request.path in http_tokens.PATHS):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            name = None
            for token, who in self.token.items():  # every entry compared, in constant time each
                if hmac.compare_digest(given.strip().encode(), token.encode()):
                    name = who
            if scheme.lower() != "bearer" or name is None:
                raise HttpError(401, "invalid or missing bearer token", code="invalid_api_key")
            request["identity"] = f"http:{name}"
        objective = request.headers.get(OBJECTIVE_HEADER, "").strip()
        if objective in self.objective_nice:
            request["nice"] = self.objective_nice[objective]
        return await handler(request)

    # ---- handlers ---------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        st = await self.client.stats()
        ok = st["phase"] == "serving" and st["workers"]["up"] > 0
        data = {
            "status": "ok" if ok else st["phase"],
            "workers": st["workers"],
            "queue": st["queue"],
            "requests": st["requests"],
        }
        return web.json_response(data, status=200 if ok else 503)

    async def _model(self, name: str) -> dict[str, Any]:
        """vLLM's model card: ``max_model_len`` is the context a worker reported (null until one has)."""
        limit = (await self.client.stats()).get("max_context") or None
        return {"id": name, "object": "model", "created": self.created, "owned_by": "quantad", "max_model_len": limit}

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [await self._model(self.models[0])]})

    async def get_model(self, request: web.Request) -> web.Response:
        served(request.match_info["model"], self.models)
        return web.json_response(await self._model(self.models[0]))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        messages, params = chat_fields(body, self.models)
        stream = bool(body.get("stream", False))
        n = choices_of(body)
        params.pop("n", None)
        if n > 1:  # n requests of one fork group: the prompt is prefilled once
            return await Choices(
                self.client, self.models[0], request, messages, for_caller(request, params), n
            ).respond(stream, wants_usage(body))
        async with await Followed.submit(self.client, request, messages, stream=stream, **params) as run:
            pid = run.pid
            meta = {
                "id": f"chatcmpl-{pid}-{uuid.uuid4().hex[:12]}",
                "created": int(time.time()),
                "model": self.models[0],
            }
            if stream:
                resp, run.ended = await self._stream(request, run.events, pid, meta, wants_usage(body))
                return resp
            done = done_data(await run.last())
            headers = {"x-quantad-pid": str(pid)}
            if done.stats.get("grammar_complete") is False:
                headers["x-quantad-warning"] = CUT_GRAMMAR
            return web.json_response(completion(meta, done), headers=headers)

    async def resume(self, request: web.Request) -> web.StreamResponse:
        """A stream cut short (the daemon restarted): the rest of request ``pid`` after ``Last-Event-ID``.

        Every chunk of a stream carries an SSE ``id`` of ``PID.TOKENS.CHARS``; a client that lost
        its stream asks here with the last one it had and gets the rest, as chunks of the same shape.
        """
        try:
            pid = int(request.match_info["pid"])
            last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or f"{pid}.0.0"
            at_pid, tokens, chars = (int(x) for x in last.split("."))
        except ValueError:
            raise HttpError(400, "the pid and Last-Event-ID must read PID and PID.TOKENS.CHARS") from None
        if at_pid != pid or tokens < 0 or chars < 0:
            raise HttpError(400, f"Last-Event-ID {last!r} is not of request {pid}")
        fields = {"on_behalf_of": request["identity"]} if "identity" in request else {}
        cid = await self.client.attach(pid, tokens, chars, **fields)
        events = self.client.events(cid)
        try:
            first = await anext(events)
            if not isinstance(first, E.Attached):
                raise rejection(first)
            meta = {"id": f"chatcmpl-{pid}-resumed", "created": int(time.time()), "model": self.models[0]}
            index = choice_index(request)
            resp, _ = await self._stream(request, events, pid, meta, False, at=(tokens, chars), index=index)
            return resp
        finally:
            await events.aclose()

    async def _stream(
        self,
        request: web.Request,
        events: AsyncIterator[Event],
        pid: int,
        meta: dict[str, Any],
        usage: bool,
        at: tuple[int, int] | None = None,
        index: int = 0,
    ) -> tuple[web.StreamResponse, bool]:
        """SSE chunks as OpenAI sends them; preemptions as SSE comments; an error as a final ``error`` chunk.

        Each chunk's SSE ``id`` is ``PID.TOKENS.CHARS``: what a client that loses the stream gives
        ``resume``.  ``at``: a resumed stream's counts (no role chunk then); ``index``: the choice it
        is (one of ``n``).  Returns the response and whether the request reached its terminal event.
        """
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "x-quantad-pid": str(pid)}
        )
        await resp.prepare(request)
        head = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None}
        seen = list(at or (0, 0))  # tokens and characters sent so far
        streamed: set[str] = set()  # ids of the tool calls sent as deltas

        async def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: list | None = None) -> None:
            lp = None if logprobs is None else {"content": logprobs, "refusal": None}
            data = {**head, "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}]}
            await resp.write(sse_id(pid, seen) + b"data: " + json.dumps(data).encode() + b"\n\n")

        try:
            if at is None:
                await chunk({"role": "assistant", "content": ""})
            async for ev in events:
                if isinstance(ev, E.Token):
                    seen = stream_position(seen, ev)
                    if ev.text or ev.logprobs:
                        await chunk({"content": ev.text}, logprobs=ev.logprobs)
                elif isinstance(ev, E.ToolCall):  # OpenAI's delta: id, type and name first, then argument text
                    streamed.add(ev.tool_call.get("id", ""))
                    await chunk({"tool_calls": [ev.tool_call]})
                elif isinstance(ev, (E.Preempted, E.Resumed)):
                    # a comment line, part of the next event's block: a blank line after it would make an
                    # empty event of its own, which SDKs that keep the last id (openai's) fail to parse
                    await resp.write(f": quantad {ev.event} tokens={ev.tokens} context={ev.context}\n".encode())
                elif ev.terminal:
                    await self._end(resp, chunk, head, ev, usage, streamed)
                    return resp, True
        except ConnectionError:  # the client hung up between two writes
            pass
        return resp, False

    async def _end(
        self, resp: web.StreamResponse, chunk, head: dict[str, Any], ev: Event, usage: bool, streamed: set[str]
    ) -> None:
        if not isinstance(ev, E.Done):  # headers are gone: the error travels as a chunk (the OpenAI client raises it)
            await resp.write(b"data: " + json.dumps(error_of(ev).body()).encode() + b"\n\n")
            await resp.write_eof()
            return
        done = ev
        if done.content_tail:  # content held back because it looked like the start of a tool call
            await chunk({"content": done.content_tail})
        late = [{"index": i, **c} for i, c in enumerate(tool_calls(done)) if c["id"] not in streamed]
        if late:  # calls the stream did not show as it went (written in another key order)
            await chunk({"tool_calls": late})
        if done.stats.get("grammar_complete") is False:
            await resp.write(f": quantad warning {CUT_GRAMMAR}\n".encode())
        await chunk({}, done.finish_reason)
        if usage:
            data = {**head, "choices": [], "usage": done.usage or {}}
            await resp.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
