"""The API worker process: requests on an OpenAI-compatible endpoint, under the daemon's quanta.

It speaks the same worker protocol as the HuggingFace worker (docs/protocol.md section 6),
so one policy schedules local and remote models.  One asyncio loop: a receive loop for the
daemon's socket, a heartbeat task, and one task per running request, each reading its own
HTTP stream.  At a quantum end a task stops reading (backpressure) and waits for the daemon;
``preempt`` closes the stream, so the server stops generating, and keeps the text streamed so
far as the request's context (``backends.continuation``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from backends.continuation import METHODS, NONE, Attempt, LocalTemplate, ReplayDiverged, TextContext, request_for
from backends.json_check import json_problem
from backends.openai_endpoint import Endpoint, RemoteError, api_key, classify
from ipc import protocol as P
from ipc.logfmt import setup as setup_logging

log = logging.getLogger("quantad.api")


@dataclass
class Slot:
    """A running request: its context, its task and the quantum it is in."""

    ctx: TextContext
    quantum_tokens: int | None = None
    quantum_ms: float | None = None
    used: int = 0
    started: float = 0.0
    task: asyncio.Task | None = None
    gate: asyncio.Future | None = None  # set while paused at a quantum end

    def new_quantum(self, tokens: int | None, ms: float | None) -> None:
        self.quantum_tokens, self.quantum_ms, self.used, self.started = tokens, ms, 0, time.monotonic()

    def quantum_over(self) -> bool:
        if self.quantum_tokens is not None and self.used >= self.quantum_tokens:
            return True
        return self.quantum_ms is not None and (time.monotonic() - self.started) * 1000 >= self.quantum_ms


class Preempted(Exception):
    """The daemon took the slot back at a quantum end."""


class ApiWorker:
    def __init__(self, args: argparse.Namespace, template: LocalTemplate | None):
        self.name, self.slots, self.heartbeat_s = args.name, args.slots, args.heartbeat_s
        self.retries = args.api_retries
        self.template = template
        self.api = Endpoint(args.base_url, args.model, api_key(args.api_key_env, args.api_key_file),
                            args.api_timeout_s, args.resume_method, template)  # fmt: skip
        self.running: dict[int, Slot] = {}
        self.saved: dict[int, TextContext] = {}  # preempted requests: their text snapshots
        self.prompt_tokens = self.completion_tokens = 0
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, self.name.encode())
        self.sock.connect(args.endpoint)
        self._tx = zmq.Socket.shadow(self.sock.underlying)  # plain sends from any coroutine, in order
        self.stopping = asyncio.Event()
        self._detecting: asyncio.Task | None = None

    # ---- socket -------------------------------------------------------------------------
    def send(self, op: str, **fields: Any) -> None:
        fields["op"] = op
        self._tx.send(P.pack(fields))

    async def serve(self) -> None:
        try:  # detect before ``ready``, within bounds: a dead endpoint must not hold the daemon up
            method = await asyncio.wait_for(self.api.resume_method(), min(2 * self.api.timeout_s, 30.0))
        except TimeoutError:
            method = None
        self.send(P.W_READY, worker=self.name, slots=self.slots, device=f"api:{self.api.base_url}",
                  model=self.api.model, pid=os.getpid(), preemptible=method not in (None, NONE))  # fmt: skip
        tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._beat())]
        await self.stopping.wait()
        for t in [*tasks, *(s.task for s in self.running.values() if s.task)]:
            t.cancel()
        await asyncio.gather(*tasks, *(s.task for s in self.running.values() if s.task), return_exceptions=True)
        await self.api.close()
        self.sock.close(0)
        self.ctx.term()

    async def _receive(self) -> None:
        while True:  # one long-lived receive loop: cancelling a pending recv could lose a message
            frames = await self.sock.recv_multipart()
            try:
                self.dispatch(P.unpack(frames[0], max_size=P.MAX_FRAME))
            except P.ProtocolError as exc:
                log.error("bad message from daemon: %s", exc.message)
            except Exception:  # a bug must not leave the worker deaf
                log.exception("cannot handle a message from the daemon")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self.send(P.W_HEARTBEAT, stats=self.stats())

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

    def dispatch(self, msg: dict) -> None:
        handler = {
            P.D_RUN: self.on_run,
            P.D_CONTINUE: self.on_continue,
            P.D_PREEMPT: self.on_preempt,
            P.D_CANCEL: self.on_cancel,
            P.D_EXPORT: self.on_export,
            P.D_SHUTDOWN: lambda _: self.stopping.set(),
        }.get(msg["op"])
        if handler is None:
            raise P.ProtocolError(P.E_UNKNOWN_OP, f"unknown op {msg['op']!r}")
        handler(msg)

    # ---- daemon ops ---------------------------------------------------------------------
    def on_run(self, msg: dict) -> None:
        rid = P.field(msg, "rid", int)
        if rid in self.running:
            log.error("run for request %s, which is already running: ignored", rid)
            return
        ctx = self.saved.pop(rid, None)
        if ctx is None:  # first run, a restart after a dead worker, or a migration: the daemon's record
            ctx = TextContext(rid, P.field(msg, "params", dict))
            ctx.text = P.field(msg, "resume_text", str, "")
            ctx.released = len(ctx.text)
            if "migrate" in msg:
                ctx.load_state(P.field(msg, "migrate", dict))
            elif ctx.text:
                ctx.generated = P.field(msg, "resume_tokens", int, 0) or self._count(ctx.text)
        slot = Slot(ctx)
        slot.new_quantum(P.field(msg, "quantum_tokens", int, None), P.field(msg, "quantum_ms", (int, float), None))
        slot.task = asyncio.get_running_loop().create_task(self._drive(slot))
        self.running[rid] = slot

    def on_continue(self, msg: dict) -> None:
        slot = self.running.get(P.field(msg, "rid", int))
        if slot is not None and slot.gate is not None and not slot.gate.done():
            slot.new_quantum(P.field(msg, "quantum_tokens", int, None), P.field(msg, "quantum_ms", (int, float), None))
            slot.gate.set_result(False)

    def on_preempt(self, msg: dict) -> None:
        slot = self.running.get(P.field(msg, "rid", int))
        if slot is not None and slot.gate is not None and not slot.gate.done():
            slot.gate.set_result(True)

    def on_cancel(self, msg: dict) -> None:
        rid = P.field(msg, "rid", int)
        self.saved.pop(rid, None)
        slot = self.running.pop(rid, None)
        if slot is not None and slot.task is not None:
            slot.task.cancel()  # leaving ``async with`` closes the HTTP stream

    def on_export(self, msg: dict) -> None:
        """Migration: the text lives in the daemon already; only the counters travel."""
        rid = P.field(msg, "rid", int)
        ctx = self.saved.pop(rid, None)
        if ctx is None:
            self.send(P.W_EXPORTED, rid=rid, lost=True)
        else:
            self.send(P.W_EXPORTED, rid=rid, migrate=ctx.migrate_state(), tensors=[])

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
            self.send(P.W_PREEMPTED, rid=rid, tier=P.TIER_HOST, bytes=slot.ctx.nbytes, switch_s=dt)
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
        self.send(P.W_FAILED, rid=rid, code=code, message=message)

    async def _generate(self, slot: Slot) -> None:
        """Streams until the request ends or is preempted; retries what is safe to retry."""
        ctx, failures = slot.ctx, 0
        while True:
            if ctx.text and ctx.remaining <= 0:  # resumed or restarted after its last token
                return self._finish(slot, "length", None)
            resuming = bool(ctx.text or ctx.tool_calls)
            if self.api.method is None and not resuming and self._detecting is None:
                self._detecting = asyncio.create_task(self._detect_again())  # the start-up probe had no answer
            method = await self.api.resume_method() if resuming else None
            if resuming and (method is None or not ctx.continuable_by(method)):
                method = None  # replay from the start; the text already streamed is checked, not shown twice
                ctx.replay = ctx.text = ctx.text[: ctx.released]
                ctx.generated, ctx.tool_calls = 0, {}
            if method is not None:
                ctx.resumes += 1
                ctx.method = method
            t0 = time.perf_counter()
            kind, kw = request_for(ctx, self.api.model, method, self.template)
            prefix = ctx.generated if method else 0
            attempt = Attempt(self._count(kw.get("prompt", "")) if kind == "completions" else None, prefix)
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

    async def _detect_again(self) -> None:
        try:
            await self.api.resume_method()
        finally:
            self._detecting = None

    async def _stream(self, slot: Slot, kind: str, kw: dict, attempt: Attempt, resumed: bool) -> None:
        ctx = slot.ctx
        stops = list(ctx.params.get("stop") or [])
        finish_reason, usage, t0 = None, None, time.perf_counter()
        async with await self.api.open(kind, kw) as stream:
            async for chunk in stream:
                usage = getattr(chunk, "usage", None) or usage
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                delta = choice.text if kind == "completions" else choice.delta.content
                if kind == "chat" and choice.delta.tool_calls:
                    ctx.add_tool_deltas(choice.delta.tool_calls)
                    n = sum(
                        self._count(d.function.arguments or "") if d.function else 0 for d in choice.delta.tool_calls
                    )
                    n = max(n, 1)
                    ctx.generated, slot.used = ctx.generated + n, slot.used + n
                if delta:
                    if resumed and ctx.generated == attempt.prefix_tokens:
                        ctx.resume_wait_s += time.perf_counter() - t0
                    n = self._count(delta) or 1
                    replaying = bool(ctx.replay)
                    new = ctx.add_text(delta)
                    ctx.generated += n
                    slot.used += n
                    self.completion_tokens += n
                    out, stopped = ctx.release(stops)
                    self.send(P.W_TOKENS, rid=ctx.rid, ids=[], text=out, n=0 if replaying and not new else n)
                    if stopped:
                        finish_reason = "stop"
                        break
                finish_reason = choice.finish_reason or finish_reason
                if finish_reason is None and ctx.remaining > 0 and slot.quantum_over():
                    await self._pause(slot)
        if finish_reason is None:
            raise RemoteError("the remote closed the stream without a finish_reason", True)
        if usage is not None:
            attempt.prompt_tokens = usage.prompt_tokens
        self._finish(slot, finish_reason, usage)

    async def _pause(self, slot: Slot) -> None:
        """Stop reading (the server's writes back up) until the daemon says continue or preempt."""
        ctx = slot.ctx
        slot.gate = asyncio.get_running_loop().create_future()
        method = self.api.method or NONE
        self.send(P.W_QUANTUM_END, rid=ctx.rid, emitted=ctx.generated, preemptible=ctx.continuable_by(method))
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
            self.send(P.W_TOKENS, rid=ctx.rid, ids=[], text=rest, n=0)
        base = self._count(self.template.render(ctx.params["messages"])) if self.template else None
        base, computed, extra = ctx.prompt_stats(base)
        self.prompt_tokens += computed
        if usage is not None and not ctx.resumes and not ctx.replay:
            completion = usage.completion_tokens  # the server's own count, when the stream was never cut
        else:
            completion = ctx.generated
        problem = None if ctx.tool_calls else json_problem(ctx.text, ctx.params.get("response_format"))
        if problem is not None:  # some endpoints accept response_format without enforcing it
            log.warning("event=invalid_output rid=%s problem=%r", ctx.rid, problem)
            self.send(P.W_FAILED, rid=ctx.rid, code=P.E_INVALID_OUTPUT, message=problem)
            return
        fields: dict[str, Any] = {}
        if ctx.tool_calls:
            fields["tool_calls"] = [ctx.tool_calls[i] for i in sorted(ctx.tool_calls)]
        self.send(
            P.W_FINISHED,
            rid=ctx.rid,
            finish_reason=reason,
            content=ctx.text,  # tool calls arrive structured, never as markup in the text
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
            **fields,
        )

    def _count(self, text: str) -> int:
        """Tokens in ``text`` by the local tokenizer; without one, 0 (callers count one per delta)."""
        return self.template.count(text) if self.template and text else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="quantad-api-worker", description="quantad worker for an OpenAI-compatible API")
    ap.add_argument("--endpoint", required=True, help="daemon's worker endpoint")
    ap.add_argument("--name", required=True, help="fixed routing id, so a reconnect is recognised")
    ap.add_argument("--base-url", required=True, help="the API's base URL, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", required=True, help="model name the API expects")
    ap.add_argument("--api-key-env", help="environment variable holding the API key (default: OPENAI_API_KEY)")
    ap.add_argument("--api-key-file", help="file holding the API key")
    ap.add_argument("--tokenizer", help="the model's tokenizer directory: token counts and completions resume")
    ap.add_argument("--slots", type=int, default=4, help="concurrent streams")
    ap.add_argument("--api-timeout-s", type=float, default=60.0, help="longest silence of the remote (connect <= 10 s)")
    ap.add_argument("--api-retries", type=int, default=4, help="retries of a failed stream, with exponential backoff")
    ap.add_argument("--resume-method", default="auto", choices=["auto", *METHODS], help="auto: detect once")
    ap.add_argument("--heartbeat-s", type=float, default=1.0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(logging.INFO, worker=args.name)  # the daemon's format ($QUANTAD_LOG_FORMAT), journald-aware
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when workers stop
    if args.resume_method == "completions" and not args.tokenizer:
        raise SystemExit("quantad-api-worker: --resume-method completions needs --tokenizer")
    template = LocalTemplate(args.tokenizer) if args.tokenizer else None

    async def run() -> None:
        worker = ApiWorker(args, template)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.stopping.set)
        await worker.serve()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
