"""The API engine: requests on an OpenAI-compatible endpoint, under the daemon's quanta.

It runs behind the same worker skeleton as the HuggingFace engine (docs/protocol.md section
6), so one policy schedules local and remote models.  Each running request is an asyncio task
reading its own HTTP stream.  At a quantum end a task stops reading (backpressure) and waits
for the daemon; ``preempt`` closes the stream, so the server stops generating, and keeps the
text streamed so far as the request's context (``backends.continuation``).

The tasks run on an asyncio loop in a thread of the engine's own (``LoopThread``).  The
skeleton's calls reach that loop by ``call_soon_threadsafe``, in order; what the tasks report
goes back as encoded records over an inproc PAIR socket that the skeleton polls
(``sockets``), and ``on_readable`` sends them on: the skeleton's thread stays the only one
on the daemon's socket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import zmq

from backends import api_logprobs
from backends.continuation import COMPLETIONS, NONE, Attempt, LocalTemplate, ReplayDiverged, TextContext, request_for
from backends.engine import Engine, Send
from backends.json_check import json_problem
from backends.openai_endpoint import Endpoint, RemoteError, api_key, classify
from backends.quantum import QuantumMeter
from ipc import messages as M
from ipc import protocol as P
from ipc.worker_spec import WorkerSpec

log = logging.getLogger("quantad.api")

STATS_WAIT_S = 1.0  # a heartbeat does not wait longer for the loop's figures (it sends the last ones)
STOP_WAIT_S = 5.0  # closing the streams, at shutdown


class LoopThread:
    """An asyncio loop on a thread of its own; its records reach the skeleton's thread by an inproc PAIR."""

    _ids = itertools.count()

    def __init__(self, ctx: zmq.Context, name: str):
        self.loop = asyncio.new_event_loop()
        address = f"inproc://quantad-api-{os.getpid()}-{next(self._ids)}"
        self.inbox = self._pair(ctx, zmq.RCVHWM)  # the skeleton's side: it polls this one
        self.inbox.bind(address)
        self._outbox = self._pair(ctx, zmq.SNDHWM)  # the loop's side: only its thread uses it from now on
        self._outbox.connect(address)
        self.thread = threading.Thread(target=self._main, name=f"{name or 'api'}-streams", daemon=True)
        self.thread.start()

    @staticmethod
    def _pair(ctx: zmq.Context, hwm: int) -> zmq.Socket:
        sock = ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(hwm, 0)  # no limit: the loop never blocks on, nor drops, a record
        return sock

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self._outbox.close(0)
            self.loop.close()

    # ---- the loop's side ----------------------------------------------------------------
    def post(self, record: M.Message) -> None:
        """One record for the daemon, sent from the loop's thread."""
        self._outbox.send(P.pack(record.encode()))

    # ---- the skeleton's side ------------------------------------------------------------
    def soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop, after whatever was handed over before."""

        def guarded() -> None:
            try:
                fn(*args)
            except Exception:  # a bug must not stop the loop
                log.exception("cannot handle a message from the daemon")

        self.loop.call_soon_threadsafe(guarded)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """``fn(*args)`` run on the loop; its result (or exception) here."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # SystemExit too: it belongs to the caller
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done.result(timeout)

    def wait(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def forward(self, send: Send) -> None:
        """Send on every record the loop has posted."""
        while True:
            try:
                frames = self.inbox.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                record, _ = M.read(frames, M.FROM_WORKER, max_size=1 << 62)  # our own: no frame limit
            except P.ProtocolError as exc:  # the daemon would refuse it too
                log.error("event=record_dropped side=api error=%r", exc.message)
                continue
            send(record)

    def stop(self, closing: Coroutine[Any, Any, Any]) -> None:
        """Run ``closing`` on the loop, then end the loop and its thread."""
        try:
            self.wait(closing, STOP_WAIT_S)
        except Exception:
            log.exception("cannot close the streams")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(STOP_WAIT_S)
        if self.thread.is_alive():  # stuck: its socket must not hold up the context's term
            log.error("event=loop_stuck side=api")
            self._outbox.close(0)
        self.inbox.close(0)


class ApiEngine(Engine):
    """The skeleton's handle on the streams: every call is handed to the loop's thread."""

    def __init__(self, spec: WorkerSpec, send: Send, ctx: zmq.Context):
        super().__init__(spec, send, ctx)
        if not spec.base_url:
            raise SystemExit("quantad-api-worker: --base-url is required with --backend openai")
        if spec.resume_method == "completions" and not spec.tokenizer:
            raise SystemExit("quantad-api-worker: --resume-method completions needs --tokenizer")
        for noisy in ("httpx", "httpx2", "openai"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        key = api_key(spec.api_key_env, spec.api_key_file)
        template = LocalTemplate(spec.tokenizer) if spec.tokenizer else None
        self.bridge = LoopThread(ctx, spec.name)
        self.streams: Streams = self.bridge.call(Streams, spec, key, template, self.bridge.post)
        self._stats: dict[str, Any] = {}

    def ready(self) -> M.Ready:
        # Detect before ``ready``, within bounds: a dead endpoint must not hold the daemon up.
        method = self.bridge.wait(self.streams.detect(min(2 * self.spec.api_timeout_s, 30.0)))
        return M.Ready(
            worker=self.spec.name,
            slots=self.spec.slots,
            device=f"api:{self.spec.base_url}",
            model=self.spec.model,
            pid=os.getpid(),
            preemptible=method not in (None, NONE),
        )

    def run(self, run: M.Run, frames: list) -> None:
        if run.params.prompt is not None and run.params.response_format:  # /v1/completions has no such field
            why = "'response_format' with 'prompt' is not supported by API workers (use messages)"
            self.send(M.Failed(run.rid, P.E_UNSUPPORTED, why))
            return
        self.bridge.soon(self.streams.start, run)

    def keep(self, cont: M.Continue) -> None:
        self.bridge.soon(self.streams.keep, cont)

    def preempt(self, rid: int) -> None:
        self.bridge.soon(self.streams.preempt, rid)

    def cancel(self, rid: int) -> None:
        self.bridge.soon(self.streams.cancel, rid)

    def export(self, exp: M.Export) -> None:
        self.bridge.soon(self.streams.export, exp)

    def stats(self) -> dict[str, Any]:
        try:
            self._stats = self.bridge.call(self.streams.stats, timeout=STATS_WAIT_S)
        except TimeoutError:
            log.warning("event=stats_late side=api")
        return self._stats

    def sockets(self) -> list[zmq.Socket]:
        return [self.bridge.inbox]

    def on_readable(self, sock: zmq.Socket) -> None:
        self.bridge.forward(self.send)

    def close(self) -> None:
        self.bridge.stop(self.streams.close())


@dataclass
class Slot:
    """A running request: its context, its task and its use of the quantum it is in (wall time)."""

    ctx: TextContext
    meter: QuantumMeter = field(default_factory=lambda: QuantumMeter(wall=True))
    task: asyncio.Task | None = None
    gate: asyncio.Future | None = None  # set while paused at a quantum end


class Preempted(Exception):
    """The daemon took the slot back at a quantum end."""


class Streams:
    """The requests of one endpoint, one asyncio task each; every method runs on the loop's thread."""

    def __init__(self, spec: WorkerSpec, key: str, template: LocalTemplate | None, post: Callable[[M.Message], None]):
        self.retries = spec.api_retries
        self.template = template
        self.post = post
        self.api = Endpoint(spec.base_url, spec.model, key, spec.api_timeout_s, spec.resume_method, template)
        self.running: dict[int, Slot] = {}
        self.saved: dict[int, TextContext] = {}  # preempted requests: their text snapshots
        self.prompt_tokens = self.completion_tokens = 0
        self._detecting: asyncio.Task | None = None

    async def detect(self, bound_s: float) -> str | None:
        """The resume method, or None when the endpoint gave no answer within ``bound_s``."""
        try:
            return await asyncio.wait_for(self.api.resume_method(), bound_s)
        except TimeoutError:
            return None

    async def close(self) -> None:
        tasks = [s.task for s in self.running.values() if s.task]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.api.close()

    def stats(self) -> dict[str, Any]:
        host = {"count": len(self.saved), "bytes": sum(c.nbytes for c in self.saved.values())}
        return {
            "running": len(self.running),
            "batch": sum(s.gate is None for s in self.running.values()),
            "contexts": {"tiers": {P.TIER_HOST: host}},
            "prefill_tokens": self.prompt_tokens,
            "decode_tokens": self.completion_tokens,
            "resume_method": self.api.method,
        }

    # ---- daemon ops ---------------------------------------------------------------------
    def start(self, run: M.Run) -> None:
        if run.rid in self.running:
            log.error("run for request %s, which is already running: ignored", run.rid)
            return
        ctx = self.saved.pop(run.rid, None)
        if ctx is None:  # first run, a restart after a dead worker, or a migration: the daemon's record
            ctx = TextContext(run.rid, run.params)
            ctx.text = run.resume_text
            ctx.released = len(ctx.text)
            if run.migrate is not None:
                ctx.load_state(run.migrate)
            elif ctx.text:
                ctx.generated = run.resume_tokens or self._count(ctx.text)
        slot = Slot(ctx)
        slot.meter.start(run.quantum)
        slot.task = asyncio.get_running_loop().create_task(self._drive(slot))
        self.running[run.rid] = slot

    def keep(self, cont: M.Continue) -> None:
        slot = self.running.get(cont.rid)
        if slot is not None and slot.gate is not None and not slot.gate.done():
            slot.meter.start(cont.quantum)
            slot.gate.set_result(False)

    def preempt(self, rid: int) -> None:
        slot = self.running.get(rid)
        if slot is not None and slot.gate is not None and not slot.gate.done():
            slot.gate.set_result(True)

    def cancel(self, rid: int) -> None:
        self.saved.pop(rid, None)
        slot = self.running.pop(rid, None)
        if slot is not None and slot.task is not None:
            slot.task.cancel()  # leaving ``async with`` closes the HTTP stream

    def export(self, exp: M.Export) -> None:
        """Migration: the text lives in the daemon already; only the counters travel."""
        ctx = self.saved.pop(exp.rid, None)
        if ctx is None:
            self.post(M.Exported(exp.rid, lost=True))
        else:
            self.post(M.Exported(exp.rid, migrate=ctx.migrate_state(), tensors=[]))

    # ---- a request ----------------------------------------------------------------------
    async def _drive(self, slot: Slot) -> None:
        rid = slot.ctx.rid
        try:
            await self._generate(slot)
        except asyncio.CancelledError:
            return
        except Preempted as exc:
            dt = time.perf_counter() - exc.args[0]  # closing the stream
            slot.ctx.switch_s += dt
            self.saved[rid] = slot.ctx
            self.running.pop(rid, None)
            self.post(M.Preempted(rid, tier=P.TIER_HOST, bytes=slot.ctx.nbytes, switch_s=dt))
            return
        except (RemoteError, ReplayDiverged, ValueError) as exc:
            message, code = getattr(exc, "message", str(exc)), P.E_REMOTE
            log.warning("event=request_failed rid=%s error=%r", rid, message)
        except Exception as exc:
            log.exception("request %s failed", rid)
            message, code = f"{type(exc).__name__}: {exc}", P.E_INTERNAL
        else:
            return
        self.running.pop(rid, None)
        self.post(M.Failed(rid, code=code, message=message))

    async def _generate(self, slot: Slot) -> None:
        """Streams until the request ends or is preempted; retries what is safe to retry."""
        ctx, failures = slot.ctx, 0
        while True:
            if ctx.text and ctx.remaining <= 0:  # resumed or restarted after its last token
                return self._finish(slot, "length", None)
            method = await self._method_for(ctx)
            t0 = time.perf_counter()
            kind, kw = request_for(ctx, self.api.model, method, self.template)
            prefix = ctx.generated if method else 0
            attempt = Attempt(self._prompt_count(kw["prompt"]) if kind == "completions" else None, prefix)
            ctx.attempts.append(attempt)
            ctx.switch_s += time.perf_counter() - t0 if method else 0.0
            before = ctx.generated
            try:
                return await self._stream(slot, kind, kw, attempt, resumed=method is not None)
            except (Preempted, asyncio.CancelledError, ReplayDiverged):
                raise
            except Exception as exc:
                err = classify(exc, self.api.timeout_s)
                safe = ctx.generated == before or ctx.continuable_by(self.api.method or NONE)
                if not (err.retryable and safe) or failures >= self.retries:
                    raise err from None
                failures += 1
                delay = min(0.5 * 2 ** (failures - 1), 8.0)
                log.warning("event=retry rid=%s in_s=%s error=%r", ctx.rid, delay, err.message)
                await asyncio.sleep(delay)

    async def _method_for(self, ctx: TextContext) -> str | None:
        """How the next stream goes on from ``ctx``'s text: None for a fresh start or a replay."""
        resuming = bool(ctx.text or ctx.tool_calls)
        if self.api.method is None and not resuming and self._detecting is None:
            self._detecting = asyncio.create_task(self._detect_again())  # the start-up probe had no answer
        if ctx.completion:  # prompt + text, on the endpoint it already runs on
            method = COMPLETIONS if resuming else None
        else:
            method = await self.api.resume_method() if resuming else None
        if resuming and (method is None or not ctx.continuable_by(method)):
            method = None  # replay from the start; the text already streamed is checked, not shown twice
            ctx.replay = ctx.text = ctx.text[: ctx.released]
            ctx.generated, ctx.tool_calls = 0, {}
        if method is not None:
            ctx.resumes += 1
            ctx.method = method
        return method

    async def _detect_again(self) -> None:
        try:
            await self.api.resume_method()
        finally:
            self._detecting = None

    async def _stream(self, slot: Slot, kind: str, kw: dict, attempt: Attempt, resumed: bool) -> None:
        ctx = slot.ctx
        stops = list(ctx.params.stop)
        top_k = ctx.params.top_logprobs if ctx.params.logprobs else None
        finish_reason, usage, t0 = None, None, time.perf_counter()
        async with await self.api.open(kind, kw) as stream:
            async for chunk in stream:
                usage = getattr(chunk, "usage", None) or usage
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                delta = choice.text if kind == "completions" else choice.delta.content
                if kind == "chat" and choice.delta.tool_calls:
                    self._tool_deltas(slot, choice.delta.tool_calls)
                logprobs = api_logprobs.entries(kind, choice, top_k) if top_k is not None else []
                if delta or logprobs:
                    if resumed and ctx.generated == attempt.prefix_tokens:
                        ctx.resume_wait_s += time.perf_counter() - t0
                    if self._text_delta(slot, delta or "", stops, logprobs):
                        finish_reason = "stop"
                        break
                finish_reason = choice.finish_reason or finish_reason
                if finish_reason is None and ctx.remaining > 0 and slot.meter.over():
                    await self._pause(slot)
        if finish_reason is None:
            raise RemoteError("the remote closed the stream without a finish_reason", True)
        if usage is not None:
            attempt.prompt_tokens = usage.prompt_tokens
        self._finish(slot, finish_reason, usage)

    def _tool_deltas(self, slot: Slot, deltas: list[Any]) -> None:
        slot.ctx.add_tool_deltas(deltas)
        n = max(sum(self._count(d.function.arguments or "") if d.function else 0 for d in deltas), 1)
        slot.ctx.generated += n
        slot.meter.count(n)

    def _text_delta(self, slot: Slot, delta: str, stops: list[str], logprobs: list) -> bool:
        """Take a streamed text delta and send what is safe to show; True when a stop string ended the turn.

        With logprobs the endpoint counts the tokens itself (one entry each); the entries go with
        the delta, not held back with a stop string's prefix, so a token's entry may come first.
        """
        ctx = slot.ctx
        n = len(logprobs) or self._count(delta) or 1
        replaying = bool(ctx.replay)
        new = ctx.add_text(delta)
        ctx.generated += n
        slot.meter.count(n)
        self.completion_tokens += n
        out, stopped = ctx.release(stops)
        shown = 0 if replaying and not new else n
        self.post(M.Tokens(ctx.rid, ids=[], text=out, n=shown, logprobs=logprobs if shown else []))
        return stopped

    async def _pause(self, slot: Slot) -> None:
        """Stop reading (the server's writes back up) until the daemon says continue or preempt."""
        ctx = slot.ctx
        slot.gate = asyncio.get_running_loop().create_future()
        method = self.api.method or NONE
        slot.meter.end()
        self.post(M.QuantumEnd(ctx.rid, emitted=ctx.generated, preemptible=ctx.continuable_by(method)))
        try:
            preempt = await slot.gate
        finally:
            slot.gate = None
        if preempt:
            raise Preempted(time.perf_counter())  # unwinding ``async with`` closes the stream: the server stops

    def _finish(self, slot: Slot, reason: str, usage: Any) -> None:
        ctx = slot.ctx
        self.running.pop(ctx.rid, None)
        rest = ctx.flush()
        if rest:
            self.post(M.Tokens(ctx.rid, ids=[], text=rest, n=0))
        base: int | None = None  # without a local count, the server's usage tells
        if ctx.completion:
            prompt = ctx.params.prompt
            base = self._prompt_count(prompt) if isinstance(prompt, list) or self.template else None
        elif self.template:
            base = self._count(self.template.render(ctx.params.messages, ctx.params.template_kwargs))
        base, computed, extra = ctx.prompt_stats(base)
        self.prompt_tokens += computed
        if usage is not None and not ctx.resumes and not ctx.replay:
            completion = usage.completion_tokens  # the server's own count, when the stream was never cut
        else:
            completion = ctx.generated
        problem = None if ctx.tool_calls else json_problem(ctx.text, ctx.params.response_format)
        if problem is not None:  # some endpoints accept response_format without enforcing it
            log.warning("event=invalid_output rid=%s problem=%r", ctx.rid, problem)
            self.post(M.Failed(ctx.rid, code=P.E_INVALID_OUTPUT, message=problem))
            return
        self.post(finished(ctx, reason, base, computed, extra, completion))

    def _prompt_count(self, prompt: str | list[int]) -> int:
        """Tokens of a completions prompt: token ids as they are, text by the local tokenizer (else 0)."""
        return len(prompt) if isinstance(prompt, list) else self._count(prompt)

    def _count(self, text: str) -> int:
        """Tokens in ``text`` by the local tokenizer; without one, 0 (callers count one per delta)."""
        return self.template.count(text) if self.template and text else 0


def finished(ctx: TextContext, reason: str, base: int, computed: int, extra: int, completion: int) -> M.Finished:
    """The ``finished`` record of a request that ended well."""
    return M.Finished(
        ctx.rid,
        finish_reason=reason,
        content=ctx.text,  # tool calls arrive structured, never as markup in the text
        tool_calls=[ctx.tool_calls[i] for i in sorted(ctx.tool_calls)],
        usage={"prompt_tokens": base, "completion_tokens": completion, "total_tokens": base + completion},
        stats={
            "prompt_tokens_computed": computed,
            "prompt_tokens_reused": 0,
            "decode_tokens_computed": ctx.generated,
            "restores": ctx.resumes,
            "worker_switch_s": round(ctx.switch_s, 6),
            "resumes": ctx.resumes,
            "resume_method": ctx.method,
            "extra_prompt_tokens": extra,
            "resume_wait_s": round(ctx.resume_wait_s, 6),
        },
    )
