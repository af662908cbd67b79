"""The HuggingFace worker process: runs slots of requests, yields at quantum ends.

One DEALER socket to the daemon, one loop: drain the daemon's messages, advance every
runnable slot by one token, heartbeat between steps.  At a quantum end the slot pauses
and asks the daemon; on ``preempt`` its context goes to the context manager, on ``run``
of a known request it comes back with no recomputation.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import time
from typing import Any

import psutil
import zmq

from backends.batch import Batch
from backends.detok import TextStream
from backends.hf_engine import HFEngine
from backends.peer import PeerLink, inbox_endpoint
from backends.sampling import choose
from backends.sequence import Sequence
from backends.structured import Structurer, as_text_message, parse_tool_calls
from contexts.kv import build_cache, cache_layers
from contexts.manager import ContextManager
from contexts.snapshot import Snapshot
from contexts.wire import from_frames, to_frames
from ipc import protocol as P
from ipc.logfmt import setup as setup_logging

log = logging.getLogger("quantad.worker")
PEER_WAIT_S = 10.0  # how long a migrated request's ``run`` waits for its context's frames (then: recompute)


class Worker:
    def __init__(self, args: argparse.Namespace):
        self.name = args.name
        self.slots = args.slots
        self.heartbeat_s = args.heartbeat_s
        self.prefill_chunk = args.prefill_chunk
        self.snapshot_tier = args.snapshot_tier
        self.engine = HFEngine(args.model, args.device, args.dtype)
        self.contexts = ContextManager(
            self.engine.device,
            args.device_budget,
            args.host_budget,
            disk_budget=args.disk_budget,
            state_dir=args.state_dir,
        )
        self.batch = Batch(self.engine.model, self.engine.config)
        self._structurer: Structurer | None = None
        self.running: dict[int, Sequence] = {}  # every request holding a slot
        self.prefilling: list[Sequence] = []  # slots still feeding their prompt, in order
        self._step_logits = None  # the last decode step's [B, vocab] output (see ``_greedy_rows``)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, self.name.encode())
        for opt in (zmq.SNDBUF, zmq.RCVBUF):  # contexts leave and arrive through it when they migrate
            self.sock.setsockopt(opt, P.BULK_SOCKET_BUFFER)
        self.sock.connect(args.endpoint)
        peer = inbox_endpoint(args.endpoint, self.name) if args.peer_endpoint == "auto" else args.peer_endpoint or None
        self.peers = PeerLink(self.ctx, peer)
        self.poller = zmq.Poller()
        for s in (self.sock, self.peers.sock):
            if s is not None:
                self.poller.register(s, zmq.POLLIN)
        self.stop = False
        self._last_beat = 0.0

    # ---- socket -------------------------------------------------------------------------
    def send(self, op: str, frames: list | None = None, **fields: Any) -> None:
        fields["op"] = op
        if frames:
            self.sock.send_multipart([P.pack(fields), *frames], copy=False)
        else:
            self.sock.send(P.pack(fields))

    def serve(self) -> None:
        self.send(
            P.W_READY,
            worker=self.name,
            slots=self.slots,
            device=str(self.engine.device),
            model=str(self.engine.model.name_or_path),
            pid=os.getpid(),
            **({"peer": self.peers.endpoint} if self.peers.endpoint else {}),
        )
        while not self.stop:
            timeout = 0 if self._has_work() else int(self.heartbeat_s * 1000)
            if self.poller.poll(timeout):
                self.peers.take()  # contexts first: a ``run`` below may be for one of them
                while self.sock.poll(0):
                    self.dispatch(self.sock.recv_multipart(copy=False))
            self.tick()
            if time.monotonic() - self._last_beat >= self.heartbeat_s:
                self.beat()
        self.peers.close()
        self.sock.close(0)
        self.ctx.term()

    def _decoding(self) -> bool:
        """The batch steps only when no row waits for the daemon's word on its quantum."""
        return len(self.batch) > 0 and not any(s.paused for s in self.batch.seqs)

    def _has_work(self) -> bool:
        return bool(self.prefilling) or self._decoding()

    def tick(self) -> None:
        """One scheduling step: a budget of prefill, then one decode step for the whole batch."""
        self._prefill_line(self.prefill_chunk)
        if self._decoding():
            try:
                self._decode()
            except Exception as exc:  # a failed batched step fails the rows it ran
                log.exception("decode step failed")
                for seq in list(self.batch.seqs):
                    self._fail(seq, exc)

    def _fits_whole(self, seq: Sequence) -> bool:
        """A new prompt short enough to prefill in one go (with others: see ``_prefill_fresh``)."""
        return not seq.prefilled and seq.cache is None and len(seq.context_ids) <= self.prefill_chunk

    def _prefill_line(self, budget: int) -> None:
        """New short prompts together in one forward; the rest (long prompts, resumed prefixes) in chunks.

        A short prompt is never split: when it does not fit what is left of the budget, it waits for
        the next step, where it is prefilled whole (and batched with the others waiting).
        """
        budget = self._prefill_fresh(budget)
        for seq in list(self.prefilling):
            if budget <= 0:
                break
            if seq not in self.prefilling or (self._fits_whole(seq) and len(seq.context_ids) > budget):
                continue
            before = seq.prefilled
            self.guard(seq, self._prefill, budget)
            budget -= max(seq.prefilled - before, 1)

    def beat(self) -> None:
        self._last_beat = time.monotonic()
        self.send(P.W_HEARTBEAT, stats=self.stats())

    def stats(self) -> dict:
        return {
            "running": len(self.running),
            "batch": len(self.batch),
            "batch_repacks": self.batch.repacks,
            "batch_swaps": self.batch.swaps,
            "contexts": self.contexts.stats(),
            "prefill_tokens": self.engine.prefill_tokens,
            "decode_tokens": self.engine.decode_tokens,
            "rss_bytes": psutil.Process().memory_info().rss,
            "host_available_bytes": psutil.virtual_memory().available,
        }

    def dispatch(self, frames: list) -> None:
        try:
            msg = P.unpack(frames[0].bytes, max_size=P.MAX_FRAME)
            msg["_frames"] = frames[1:]
            handler = {
                P.D_EXPORT: self.on_export,
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
        if rid in self.running:
            log.error("run for request %s, which is already running: ignored", rid)
            return
        try:
            if rid in self.contexts:
                seq = self._resume(rid)
            elif "migrate" in msg:
                seq = self._immigrate(rid, msg)
            else:
                seq = self._admit(rid, msg)
        except Exception as exc:  # a bad prompt must not kill the worker
            log.exception("cannot start request %s", rid)
            self.contexts.discard(rid)
            self.send(P.W_FAILED, rid=rid, code=P.E_INTERNAL, message=f"{type(exc).__name__}: {exc}")
            return
        seq.new_quantum(P.field(msg, "quantum_tokens", int, None), P.field(msg, "quantum_ms", (int, float), None))
        self.running[rid] = seq
        reason = self._already_over(seq)
        if reason is not None:  # restarted after its last token, before its ``finished`` got out
            self._release(seq)
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
        layers, logits = self._release(seq), seq.logits
        snap = Snapshot(layers=layers, logits=None if logits is None else logits.clone(), meta=seq)
        seq.cache = seq.logits = None
        moves = self.contexts.snapshot(rid, snap)
        if self.snapshot_tier not in ("auto", snap.tier) and snap.layers is not None:
            try:
                moves += self.contexts.demote(rid, self.snapshot_tier)
            except ValueError as exc:
                log.warning("cannot put request %s in tier %s: %s", rid, self.snapshot_tier, exc)
        dt = time.perf_counter() - t0
        seq.switch_s += dt
        self.send(P.W_PREEMPTED, rid=rid, tier=snap.tier, bytes=snap.nbytes, switch_s=dt)
        for m in moves:
            if m.key != rid:
                self.send(P.W_CONTEXT, rid=m.key, tier=m.tier, bytes=m.nbytes)

    def on_export(self, msg: dict) -> None:
        """Hand a preempted context to the daemon, for another worker: raw tensor frames."""
        rid = P.field(msg, "rid", int)
        if rid not in self.contexts:
            self.send(P.W_EXPORTED, rid=rid, lost=True)
            return
        t0 = time.perf_counter()
        snap = self.contexts.restore(rid)
        seq: Sequence = snap.meta
        tensors = [] if snap.layers is None else [t for kv in snap.layers for t in kv] + [snap.logits]
        specs, frames = to_frames(tensors)
        state = {
            "prefill_computed": seq.prefill_computed,
            "decode_computed": seq.decode_computed,
            "restores": seq.restores,
            "reused": seq.reused,
            "switch_s": seq.switch_s,
            "layers": 0 if snap.layers is None else len(snap.layers),
        }
        peer = P.field(msg, "peer", str, None)
        if frames and peer is not None and self.peers.push(peer, rid, specs, frames):
            state["direct"] = True  # the frames went straight to the importer's inbox
            frames = []
        seq.switch_s += time.perf_counter() - t0
        state["switch_s"] = seq.switch_s
        self.send(P.W_EXPORTED, frames=frames, rid=rid, migrate=state, tensors=specs)

    def _immigrate(self, rid: int, msg: dict) -> Sequence:
        """Continue a context that another worker exported: no recomputation when KV came along."""
        state = P.field(msg, "migrate", dict)
        seq = self._admit(rid, msg, reuse=False)  # renders the prompt, replays the detokenizer
        for name in ("prefill_computed", "decode_computed", "restores", "reused"):
            setattr(seq, name, int(state.get(name, 0)))
        seq.switch_s = float(state.get("switch_s", 0.0))
        n = int(state.get("layers", 0))
        t0 = time.perf_counter()
        specs, frames = P.field(msg, "tensors", list, []), msg["_frames"]
        if n and state.get("direct"):
            pushed = self.peers.claim(rid, PEER_WAIT_S)
            if pushed is None:  # the exporter's push never came: rebuild from the tokens
                log.warning("context %s pushed by a peer never arrived: recomputing it", rid)
                n = 0
            else:
                specs, frames = pushed
        if n:
            tensors = from_frames(specs, frames, self.engine.device)
            if len(tensors) != 2 * n + 1 or tensors[0].shape[-2] != len(seq.context_ids):
                raise P.ProtocolError(P.E_BAD_FIELD, "migrated context does not match the request's tokens")
            self.prefilling.remove(seq)
            seq.logits = tensors[-1]
            self.batch.add(seq, [(tensors[2 * i], tensors[2 * i + 1]) for i in range(n)])
            seq.switch_s += time.perf_counter() - t0
        seq.restores += 1
        return seq

    def on_cancel(self, msg: dict) -> None:
        rid = P.field(msg, "rid", int)
        seq = self.running.pop(rid, None)
        if seq is not None:
            self._release(seq, keep_kv=False)
        self.contexts.discard(rid)

    def on_shutdown(self, msg: dict) -> None:
        self.stop = True

    # ---- slots --------------------------------------------------------------------------
    @property
    def structurer(self) -> Structurer:
        """Built on first use (~0.5 s): plain chats never pay for it."""
        if self._structurer is None:
            self._structurer = Structurer(self.engine.tokenizer)
        return self._structurer

    def _admit(self, rid: int, msg: dict, reuse: bool = True) -> Sequence:
        params = P.field(msg, "params", dict)
        resume = [int(t) for t in P.field(msg, "resume_ids", list, [])]
        structured = params.get("tools") or params.get("response_format")
        if structured:
            messages, tools = self.structurer.messages(params)
        else:
            messages, tools = [as_text_message(m) for m in params["messages"]], None
        seq = Sequence(
            rid=rid,
            params=params,
            prompt_ids=self.engine.render(messages, tools),
            stream=TextStream(self.engine.tokenizer, params.get("stop") or []),
            replay=resume,
            constraint=self.structurer.constraint(params, resume) if structured else None,
        )
        for i, t in enumerate(resume):  # rebuild the detokenizer state silently
            seq.stream.push(t, stops=i + 1 >= seq.min_tokens)
        seq.generated = list(resume)
        seq.stream.emitted = min(P.field(msg, "emitted_chars", int, 0), len(seq.stream.text))
        if seq.session and reuse and not resume:
            self._reuse_session(seq)
        self.prefilling.append(seq)
        return seq

    # ---- sessions -----------------------------------------------------------------------
    @staticmethod
    def _session_key(session: str) -> int:
        """Sessions live in the context manager beside requests, under negative keys."""
        return -1 - int.from_bytes(hashlib.blake2b(session.encode(), digest_size=7).digest(), "big")

    def _reuse_session(self, seq: Sequence) -> None:
        """Start from the session's kept KV, cropped to the prefix this prompt shares with it."""
        key = self._session_key(seq.session)
        if key not in self.contexts:
            return
        snap = self.contexts.restore(key)
        kept: list[int] = snap.meta
        ids = seq.context_ids
        common = 0
        limit = min(len(kept), len(ids) - 1)  # at least one token is fed, for fresh logits
        while common < limit and kept[common] == ids[common]:
            common += 1
        if snap.layers is None or common == 0:
            return
        layers = [(k[:, :, :common], v[:, :, :common]) for k, v in snap.layers]
        seq.cache = build_cache(layers, self.engine.config)
        seq.prefilled = seq.reused = common

    def _keep_session(self, seq: Sequence, layers) -> bool:
        """Keep a finished request's KV under its session, within the tier budgets (LRU)."""
        if not seq.session or not layers:
            return False
        key = self._session_key(seq.session)
        self.contexts.discard(key)
        covered = seq.context_ids[: layers[0][0].shape[-2]]  # the last token chosen was never fed
        for m in self.contexts.snapshot(key, Snapshot(layers=layers, logits=None, meta=covered)):
            if m.key > 0:
                self.send(P.W_CONTEXT, rid=m.key, tier=m.tier, bytes=m.nbytes)
        return True

    def _resume(self, rid: int) -> Sequence:
        t0 = time.perf_counter()
        snap = self.contexts.restore(rid)
        seq: Sequence = snap.meta
        if snap.layers is None:  # recompute tier: feed prompt + generated again
            seq.cache, seq.logits, seq.prefilled = None, None, 0
            self.prefilling.append(seq)
        else:
            seq.logits = snap.logits
            self.batch.add(seq, snap.layers)
        seq.restores += 1
        seq.switch_s += time.perf_counter() - t0
        return seq

    def _release(self, seq: Sequence, keep_kv: bool = True):
        """Take a slot's sequence out of the batch or the prefill line; return its KV if asked."""
        if seq in self.batch:
            return self.batch.remove(seq, keep_kv)
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        if keep_kv and seq.cache is not None and seq.logits is not None:
            return cache_layers(seq.cache)
        return None

    # ---- generation ---------------------------------------------------------------------
    def guard(self, seq: Sequence, fn, *args: Any) -> None:
        try:
            fn(seq, *args)
        except Exception as exc:
            log.exception("request %s failed", seq.rid)
            self._fail(seq, exc)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        self.running.pop(seq.rid, None)
        self._release(seq, keep_kv=False)
        self.send(P.W_FAILED, rid=seq.rid, code=P.E_INTERNAL, message=f"{type(exc).__name__}: {exc}")

    def _prefill(self, seq: Sequence, budget: int) -> None:
        """Feed the next chunk of a slot's context; when complete, the slot joins the batch."""
        ids = seq.context_ids
        chunk = ids[seq.prefilled : seq.prefilled + budget]
        t0 = time.perf_counter()
        seq.cache, logits = self.engine.prefill(chunk, seq.cache)
        dt = time.perf_counter() - t0
        self.contexts.observe_prefill(len(chunk), dt)
        seq.charge(dt)
        seq.prefilled += len(chunk)
        seq.prefill_computed += len(chunk)
        if seq.prefilled < len(ids):
            return
        self.prefilling.remove(seq)
        seq.logits, layers, seq.cache = logits, cache_layers(seq.cache), None
        self.batch.add(seq, layers)

    def _prefill_fresh(self, budget: int) -> int:
        """Prefill the new prompts at the head of the line that fit the budget together, in one forward."""
        group: list[Sequence] = []
        for seq in self.prefilling:
            n = len(seq.context_ids)
            if not self._fits_whole(seq):
                continue
            if n > budget:
                break
            group.append(seq)
            budget -= n
        if len(group) < 2:
            return budget + sum(len(s.context_ids) for s in group)  # one alone takes the usual path
        t0 = time.perf_counter()
        try:
            rows = self.engine.prefill_many([s.context_ids for s in group])
        except Exception as exc:
            log.exception("batched prefill failed")
            for seq in group:
                self._fail(seq, exc)
            return budget
        dt, total = time.perf_counter() - t0, sum(len(s.context_ids) for s in group)
        self.contexts.observe_prefill(total, dt)
        for seq, (layers, logits) in zip(group, rows, strict=True):
            n = len(seq.context_ids)
            seq.charge(dt * n / total)
            seq.prefilled, seq.prefill_computed = n, seq.prefill_computed + n
            self.prefilling.remove(seq)
            seq.logits = logits
            self.batch.add(seq, layers)
        return budget

    def _greedy_rows(self) -> dict[int, int]:
        """Greedy choices, in one argmax, for the plain greedy rows whose logits are the last step's output.

        One argmax over the step's [B, vocab] logits instead of one per row (half the time at B=16).
        A row whose logits came from anywhere else (prefill, restore, migration) is left to ``choose``.
        """
        out = self._step_logits
        if out is None:
            return {}
        base = out.untyped_storage().data_ptr()
        rows = {}
        for seq in self.batch.seqs:
            lg = seq.logits
            if seq.constraint is None and seq.params["temperature"] <= 0.0 and lg is not None:
                if lg.untyped_storage().data_ptr() == base:
                    rows[seq.rid] = (lg.storage_offset() - out.storage_offset()) // out.stride(0)
        if len(rows) < 2:
            return {}
        best = out.argmax(-1).tolist()
        return {rid: best[i] for rid, i in rows.items()}

    def _decode(self) -> None:
        """Choose each row's next token, stream it, then feed all continuing rows in one step."""
        going: list[tuple[Sequence, int]] = []
        greedy = self._greedy_rows()
        for seq in list(self.batch.seqs):
            p = seq.params
            token = greedy.get(seq.rid)
            under_min = len(seq.generated) < seq.min_tokens
            if token is None or (under_min and token in self.engine.eos_ids):
                logits = seq.logits if seq.constraint is None else seq.constraint.apply(seq.logits)
                if seq.constraint is None and under_min:
                    logits = self.engine.without_eos(logits)
                token = choose(logits, p["temperature"], p["top_p"], seq.seed, len(seq.generated))
            seq.generated.append(token)
            if seq.constraint is not None:
                seq.constraint.accept(token)
            delta, stopped = seq.stream.push(token, stops=len(seq.generated) >= seq.min_tokens)
            reason = None
            if stopped or token in self.engine.eos_ids or (seq.constraint is not None and seq.constraint.done):
                reason = "stop"
            elif seq.remaining <= 0:
                reason = "length"
            if reason is not None:
                delta += "" if stopped else seq.stream.flush()
                self.send(P.W_TOKENS, rid=seq.rid, ids=[token], text=delta)
                layers = self.batch.remove(seq, keep_kv=bool(seq.session))
                self.running.pop(seq.rid, None)
                self.finish(seq, reason, kept=self._keep_session(seq, layers))
            else:
                self.send(P.W_TOKENS, rid=seq.rid, ids=[token], text=delta)
                going.append((seq, token))
        if not going:
            self._step_logits = None
            return
        t0 = time.perf_counter()
        rows, logits = self.batch.step({seq.rid: token for seq, token in going})
        share = (time.perf_counter() - t0) / len(going)
        self.engine.decode_tokens += len(going)
        self._step_logits = logits
        for i, seq in enumerate(rows):
            seq.charge(share)
            seq.logits = logits[i : i + 1]
            seq.decode_computed += 1
            seq.quantum_used += 1
        over = [seq for seq in rows if not seq.asked and seq.quantum_over()]
        if any(seq.quantum_tokens is None for seq in over):
            # Rows whose time quantum is nearly over end it with this one: the daemon then swaps a group of
            # rows at once, and the newcomers prefill in one forward instead of one small forward per step.
            ending = {id(seq) for seq in over}
            over += [seq for seq in rows if id(seq) not in ending and not seq.asked and seq.quantum_nearly_over()]
        for seq in over:
            # A token quantum stops the row until the daemon answers: exact, repeatable preemption points.
            # A time quantum is not exact anyway, so the row decodes on while the daemon decides: one row's
            # quantum end never stalls the whole batch for a round trip (or for a descheduled daemon).
            seq.paused, seq.asked = seq.quantum_tokens is not None, seq.quantum_tokens is None
            self.send(P.W_QUANTUM_END, rid=seq.rid, emitted=len(seq.generated), prompt_tokens=len(seq.prompt_ids))

    def finish(self, seq: Sequence, reason: str, kept: bool = False) -> None:
        self.running.pop(seq.rid, None)
        content, calls = parse_tool_calls(seq.stream.text, seq.params.get("tools"), seq.rid)
        self.send(
            P.W_FINISHED,
            rid=seq.rid,
            finish_reason="tool_calls" if calls else reason,
            session_kept=kept,
            content=content,
            tool_calls=calls,
            usage={
                "prompt_tokens": len(seq.prompt_ids),
                "completion_tokens": len(seq.generated),
                "total_tokens": len(seq.prompt_ids) + len(seq.generated),
            },
            stats={
                "prompt_tokens_computed": seq.prefill_computed,
                "prompt_tokens_reused": seq.reused,
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
    ap.add_argument("--disk-budget", type=int, default=8 << 30, help="bytes of KV in safetensors files")
    ap.add_argument("--snapshot-tier", default="auto", choices=["auto", "device", "host", "disk", "recompute"],
                    help="send every preempted context straight to this tier (tests, benchmarks)")  # fmt: skip
    ap.add_argument("--state-dir", help="this worker's own directory for disk snapshots (none: no disk tier)")
    ap.add_argument("--heartbeat-s", type=float, default=1.0)
    ap.add_argument("--prefill-chunk", type=int, default=P.DEFAULT_PREFILL_CHUNK,
                    help="prompt tokens fed per step (chunked prefill)")  # fmt: skip
    ap.add_argument(
        "--peer-endpoint",
        default="auto",
        help="where other workers push migrating contexts (auto: beside an ipc:// --endpoint; '': none)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(logging.INFO, worker=args.name)  # the daemon's format ($QUANTAD_LOG_FORMAT), journald-aware
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when workers stop
    worker = Worker(args)
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "stop", True))
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
