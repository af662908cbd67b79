"""The HuggingFace worker process: runs slots of requests, yields at quantum ends.

One DEALER socket to the daemon, one loop: drain the daemon's messages, advance every
runnable slot by one token, heartbeat between steps.  At a quantum end the slot pauses
and asks the daemon; on ``preempt`` its context goes to the context manager, on ``run``
of a known request it comes back with no recomputation.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import Any

import zmq

from backends.detok import TextStream
from backends.hf_engine import HFEngine
from backends.sampling import choose
from backends.sequence import Sequence
from contexts.kv import build_cache, cache_layers
from contexts.manager import ContextManager
from contexts.snapshot import Snapshot
from ipc import protocol as P

log = logging.getLogger("quantad.worker")


class Worker:
    def __init__(self, args: argparse.Namespace):
        self.name = args.name
        self.slots = args.slots
        self.heartbeat_s = args.heartbeat_s
        self.engine = HFEngine(args.model, args.device, args.dtype)
        self.contexts = ContextManager(self.engine.device, args.device_budget, args.host_budget)
        self.running: dict[int, Sequence] = {}
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, self.name.encode())
        self.sock.connect(args.endpoint)
        self.stop = False
        self._last_beat = 0.0

    # ---- socket -------------------------------------------------------------------------
    def send(self, op: str, **fields: Any) -> None:
        fields["op"] = op
        self.sock.send(P.pack(fields))

    def serve(self) -> None:
        self.send(
            P.W_READY,
            worker=self.name,
            slots=self.slots,
            device=str(self.engine.device),
            model=str(self.engine.model.name_or_path),
            pid=os.getpid(),
        )
        while not self.stop:
            busy = any(not s.paused for s in self.running.values())
            timeout = 0 if busy else int(self.heartbeat_s * 1000)
            if self.sock.poll(timeout):
                while self.sock.poll(0):
                    self.dispatch(self.sock.recv())
            for seq in [s for s in self.running.values() if not s.paused]:
                self.step(seq)
            if time.monotonic() - self._last_beat >= self.heartbeat_s:
                self.beat()
        self.sock.close(0)
        self.ctx.term()

    def beat(self) -> None:
        self._last_beat = time.monotonic()
        self.send(P.W_HEARTBEAT, stats=self.stats())

    def stats(self) -> dict:
        return {
            "running": len(self.running),
            "contexts": self.contexts.stats(),
            "prefill_tokens": self.engine.prefill_tokens,
            "decode_tokens": self.engine.decode_tokens,
        }

    def dispatch(self, frame: bytes) -> None:
        try:
            msg = P.unpack(frame, max_size=P.MAX_FRAME)
            handler = {
                P.D_RUN: self.on_run,
                P.D_CONTINUE: self.on_continue,
                P.D_PREEMPT: self.on_preempt,
                P.D_CANCEL: self.on_cancel,
                P.D_SHUTDOWN: self.on_shutdown,
            }.get(msg["op"])
            if handler is None:
                raise P.ProtocolError(P.E_UNKNOWN_OP, f"unknown op {msg['op']!r}")
            handler(msg)
        except P.ProtocolError as exc:
            log.error("bad message from daemon: %s", exc.message)

    # ---- daemon ops ---------------------------------------------------------------------
    def on_run(self, msg: dict) -> None:
        rid = P.field(msg, "rid", int)
        tokens = P.field(msg, "quantum_tokens", int, None)
        ms = P.field(msg, "quantum_ms", (int, float), None)
        if rid in self.running:
            log.error("run for request %s, which is already running: ignored", rid)
            return
        try:
            seq = self._resume(rid) if rid in self.contexts else self._admit(rid, msg)
        except Exception as exc:  # a bad prompt must not kill the worker
            log.exception("cannot start request %s", rid)
            self.contexts.discard(rid)
            self.send(P.W_FAILED, rid=rid, code=P.E_INTERNAL, message=f"{type(exc).__name__}: {exc}")
            return
        seq.new_quantum(tokens, ms)
        self.running[rid] = seq
        reason = self._already_over(seq)
        if reason is not None:  # restarted after its last token, before its ``finished`` got out
            self.send(P.W_TOKENS, rid=rid, ids=[], text="" if seq.stream.stopped else seq.stream.flush())
            self.finish(seq, reason)

    def _already_over(self, seq: Sequence) -> str | None:
        if not seq.generated:
            return None
        if seq.generated[-1] in self.engine.eos_ids or seq.stream.stopped:
            return "stop"
        return "length" if seq.remaining <= 0 else None

    def on_continue(self, msg: dict) -> None:
        seq = self.running.get(P.field(msg, "rid", int))
        if seq is not None:
            seq.new_quantum(P.field(msg, "quantum_tokens", int, None), P.field(msg, "quantum_ms", (int, float), None))

    def on_preempt(self, msg: dict) -> None:
        rid = P.field(msg, "rid", int)
        seq = self.running.pop(rid, None)
        if seq is None:
            return
        t0 = time.perf_counter()
        layers = cache_layers(seq.cache) if seq.cache is not None else None
        snap = Snapshot(layers=layers, logits=seq.logits, meta=seq)
        seq.cache = seq.logits = None
        moves = self.contexts.snapshot(rid, snap)
        dt = time.perf_counter() - t0
        seq.switch_s += dt
        self.send(P.W_PREEMPTED, rid=rid, tier=snap.tier, bytes=snap.nbytes, switch_s=dt)
        for m in moves:
            if m.key != rid:
                self.send(P.W_CONTEXT, rid=m.key, tier=m.tier, bytes=m.nbytes)

    def on_cancel(self, msg: dict) -> None:
        rid = P.field(msg, "rid", int)
        self.running.pop(rid, None)
        self.contexts.discard(rid)

    def on_shutdown(self, msg: dict) -> None:
        self.stop = True

    # ---- generation ---------------------------------------------------------------------
    def _admit(self, rid: int, msg: dict) -> Sequence:
        params = P.field(msg, "params", dict)
        resume = [int(t) for t in P.field(msg, "resume_ids", list, [])]
        seq = Sequence(
            rid=rid,
            params=params,
            prompt_ids=self.engine.render(params["messages"]),
            stream=TextStream(self.engine.tokenizer, params.get("stop") or []),
            replay=resume,
        )
        for t in resume:  # rebuild the detokenizer state silently
            seq.stream.push(t)
        seq.generated = list(resume)
        seq.stream.emitted = min(P.field(msg, "emitted_chars", int, 0), len(seq.stream.text))
        return seq

    def _resume(self, rid: int) -> Sequence:
        t0 = time.perf_counter()
        snap = self.contexts.restore(rid)
        seq: Sequence = snap.meta
        if snap.layers is not None:
            seq.cache = build_cache(snap.layers, self.engine.config)
            seq.logits = snap.logits
        seq.restores += 1
        seq.switch_s += time.perf_counter() - t0
        return seq

    def step(self, seq: Sequence) -> None:
        try:
            self._step(seq)
        except Exception as exc:
            log.exception("request %s failed", seq.rid)
            self.running.pop(seq.rid, None)
            self.send(P.W_FAILED, rid=seq.rid, code=P.E_INTERNAL, message=f"{type(exc).__name__}: {exc}")

    def _step(self, seq: Sequence) -> None:
        if seq.logits is None:  # new request, restart, or recompute tier: prefill
            ids = seq.prompt_ids + seq.generated
            seq.cache, seq.logits = self.engine.prefill(ids)
            seq.prefill_computed += len(ids)
            return
        p = seq.params
        token = choose(seq.logits, p["temperature"], p["top_p"], seq.seed, len(seq.generated))
        seq.generated.append(token)
        delta, stopped = seq.stream.push(token)
        reason = None
        if stopped or token in self.engine.eos_ids:
            reason = "stop"
        elif seq.remaining <= 0:
            reason = "length"
        if reason is not None:
            delta += seq.stream.flush() if not stopped else ""
            self.send(P.W_TOKENS, rid=seq.rid, ids=[token], text=delta)
            self.finish(seq, reason)
            return
        self.send(P.W_TOKENS, rid=seq.rid, ids=[token], text=delta)
        seq.logits = self.engine.decode(seq.cache, token)
        seq.decode_computed += 1
        seq.quantum_used += 1
        if seq.quantum_over():
            seq.paused = True
            self.send(P.W_QUANTUM_END, rid=seq.rid, emitted=len(seq.generated))

    def finish(self, seq: Sequence, reason: str) -> None:
        self.running.pop(seq.rid, None)
        self.send(
            P.W_FINISHED,
            rid=seq.rid,
            finish_reason=reason,
            usage={
                "prompt_tokens": len(seq.prompt_ids),
                "completion_tokens": len(seq.generated),
                "total_tokens": len(seq.prompt_ids) + len(seq.generated),
            },
            stats={
                "prompt_tokens_computed": seq.prefill_computed,
                "decode_tokens_computed": seq.decode_computed,
                "restores": seq.restores,
                "worker_switch_s": round(seq.switch_s, 6),
            },
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="quantad-worker", description="quantad HuggingFace worker process")
    ap.add_argument("--endpoint", required=True, help="daemon's worker endpoint")
    ap.add_argument("--name", required=True, help="fixed routing id, so a reconnect is recognised")
    ap.add_argument("--model", required=True, help="model directory (already converted)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--slots", type=int, default=1)
    ap.add_argument("--device-budget", type=int, default=512 << 20, help="bytes of suspended KV kept in place")
    ap.add_argument("--host-budget", type=int, default=4 << 30, help="bytes of KV swapped to host memory")
    ap.add_argument("--heartbeat-s", type=float, default=1.0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"worker={args.name} level=%(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when workers stop
    worker = Worker(args)
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "stop", True))
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
