"""The shared base of logits-based (local) engines: slots, quanta, decoding, snapshots, migration, sessions.

An engine that runs a model in this process (HuggingFace, llama.cpp) subclasses
``LocalEngine``, loads its model, calls ``super().__init__`` and implements the hooks at the end
of the class; everything else is here, once:

* slots: ``running`` (every request holding a slot), the prefill line (``backends.prefill``),
  and the batch the engine keeps (``join``/``leave``/``rows``/``forward``);
* the decode loop: each step chooses every row's token (``backends.decode``: sampling, greedy
  rows in one argmax, ``min_tokens``, grammars), streams its text (stop strings), ends rows
  (finish reasons, tool calls, usage and stats in ``Finished``), then feeds the others in one
  batched forward;
* quantum accounting after each step (``backends.quantum``): a token quantum pauses the row
  until the daemon's word; a time quantum decodes on, and rows near their end end with it;
* snapshots through the ``ContextManager``: preempt -> snapshot (device tier, or the forced
  ``--snapshot-tier``), ``Context`` messages for moves under the budgets, resume with no
  recomputation (recompute tier: the prefix is prefilled again);
* migration (``backends.migration``) and sessions (``backends.sessions``).

The hooks (their contract: ``backends.hooks.ModelHooks``) are written twice: by
``backends/hf_engine.py`` (a ``DynamicCache`` per prefilling row, one left-padded batch cache)
and by ``backends/llamacpp_engine.py`` (a llama.cpp sequence id per row in one unified cache;
a suspended row stays there as a ``contexts.resident.Resident``, its host form the bytes of
``llama_state_seq_get_data``).  An engine whose tokenizer is not a HuggingFace one overrides
``structurer`` too (llguidance takes other tokenizers).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import psutil
import torch
import zmq

from backends import adoption
from backends.chat import encode_prompt
from backends.decode import greedy_rows, next_token, quantum_ends, token_logprobs
from backends.detok import TextStream
from backends.engine import Engine, Send
from backends.hooks import ModelHooks, State
from backends.kv_engine import Restored
from backends.kv_sources import KvSources
from backends.migration import Migration
from backends.outbox import Outbox
from backends.prefill import PrefillLine
from backends.prefixes import auto_budget
from backends.sequence import Sequence
from backends.sessions import Sessions
from backends.structured import Structurer, as_text_message
from contexts.manager import ContextManager
from contexts.snapshot import Snapshot
from ipc import messages as M
from ipc import protocol as P
from ipc.worker_spec import WorkerSpec

log = logging.getLogger("quantad.worker")


class LocalEngine(Engine, ModelHooks):
    """A model in this process, stepped by the skeleton; subclasses implement the hooks below."""

    tokenizer_dir = ""  # where its tokenizer lies, for the daemon's prompt counts (``ready``)
    compute_device = ""  # where it computes, when not where its state bytes live (``self.device``)
    shares_prefixes = False  # keeps recent prompts for new ones that start alike (``backends.prefixes``);
    # every local engine keeps ended requests' whole contexts there (the next turn of a conversation)

    def __init__(self, spec: WorkerSpec, send: Send, ctx: zmq.Context):
        self.outbox = Outbox(send)
        super().__init__(spec, self.outbox.send, ctx)  # every message goes after the tokens waiting
        self.running: dict[int, Sequence] = {}
        budget = spec.prefix_cache if spec.prefix_cache >= 0 else auto_budget(psutil.virtual_memory().available)
        self.line = PrefillLine(self, spec.prefill_chunk, budget, offer_prompts=self.shares_prefixes)
        self.contexts = ContextManager(
            self.device, spec.device_budget, spec.host_budget, disk_budget=spec.disk_budget, state_dir=spec.state_dir
        )
        self.migration = Migration(self)
        self.sessions = Sessions(self)
        self.sources = KvSources(self, self.migration, self.sessions)
        self.prefill_tokens = 0  # every token through the model: tests prove a resume recomputed nothing
        self.decode_tokens = 0
        self.beats = 0  # heartbeats sent: a test waits for one sent after a moment it knows
        self._structurer: Structurer | None = None
        self._step_logits: torch.Tensor | None = None  # the last decode step's [B, vocab] output

    # ---- the skeleton's calls -------------------------------------------------------------
    def ready(self) -> M.Ready:
        return M.Ready(
            worker=self.spec.name,
            slots=self.spec.slots,
            device=self.compute_device or str(self.device),
            model=self.model_name,
            pid=os.getpid(),
            peer=self.migration.peers.endpoint,
            max_context=self.max_context or 0,
            tokenizer=self.tokenizer_dir,
            orphans=sorted(self.contexts.orphans),
        )

    def run(self, run: M.Run, frames: list) -> None:
        rid = run.rid
        if rid in self.running:
            log.error("run for request %s, which is already running: ignored", rid)
            return
        try:
            seq, kv = self.sources.find(run, frames)
            self.place(seq, kv)
        except P.ProtocolError as exc:  # the request itself is wrong (a prompt too long for the context)
            self.contexts.discard(rid)
            self.send(M.Failed(rid=rid, code=exc.code, message=exc.message))
            return
        except Exception as exc:  # a bad prompt must not kill the worker
            log.exception("cannot start request %s", rid)
            self.contexts.discard(rid)
            self.send(M.Failed(rid=rid, code=P.E_INTERNAL, message=f"{type(exc).__name__}: {exc}"))
            return
        seq.quantum.start(run.quantum)
        self.running[rid] = seq
        reason = seq.over(self.eos_ids)
        if reason is not None:  # restarted after its last token, before its ``finished`` got out
            self._release(seq)
            self.send(M.Tokens(rid=rid, ids=[], text="" if seq.stream.stopped else seq.stream.flush()))
            self._finish(seq, reason)

    def keep(self, cont: M.Continue) -> None:
        seq = self.running.get(cont.rid)
        if seq is not None:
            seq.quantum.start(cont.quantum)

    def preempt(self, rid: int) -> None:
        seq = self.running.pop(rid, None)
        if seq is None:
            return
        t0 = time.perf_counter()
        state, logits = self._release(seq), seq.logits
        snap = Snapshot(
            layers=state, logits=None if logits is None else logits.clone(), meta=seq, ident=adoption.ident(self, seq)
        )
        seq.partial = seq.logits = None
        moves = self.contexts.snapshot(rid, snap)
        tier = self.spec.snapshot_tier
        if tier not in ("auto", snap.tier) and snap.layers is not None:
            try:
                moves += self.contexts.demote(rid, tier)
            except ValueError as exc:
                log.warning("cannot put request %s in tier %s: %s", rid, tier, exc)
        dt = time.perf_counter() - t0
        seq.switch_s += dt
        self.send(M.Preempted(rid=rid, tier=snap.tier, bytes=snap.nbytes, switch_s=dt))
        for m in moves:
            if m.key != rid:
                self.send(M.Context(rid=m.key, tier=m.tier, bytes=m.nbytes))

    def cancel(self, rid: int) -> None:
        seq = self.running.pop(rid, None)
        if seq is not None:
            self._release(seq, keep=False)
        self.contexts.discard(rid)

    def export(self, exp: M.Export) -> None:
        self.migration.export(exp)

    def stats(self) -> dict[str, Any]:
        self.beats += 1
        return {
            "beat": self.beats,
            "running": len(self.running),
            "batch": len(self.rows()),
            **self.batch_stats(),
            "contexts": self.contexts.stats(),
            "prefill_tokens": self.prefill_tokens,
            "prefill_steps": self.line.steps,
            "decode_tokens": self.decode_tokens,
            "adopted_contexts": self.sources.adopted,
            **self.line.prefixes.stats(),
            "rss_bytes": psutil.Process().memory_info().rss,
            "host_available_bytes": psutil.virtual_memory().available,
        }

    def has_work(self) -> bool:
        return bool(self.line) or self._decoding()

    def step(self, prefill_budget: int = 0) -> None:
        """One scheduling step: a budget of prefill (``prefill_chunk`` unless given), then one decode step."""
        self.line.run(prefill_budget)
        if self._decoding():
            self._decode_step()

    def _decode_step(self) -> None:
        """One decode step for the whole batch; a failed batched step fails the rows it ran."""
        try:
            self._decode()
        except Exception as exc:
            log.exception("decode step failed")
            for seq in list(self.rows()):
                self.fail(seq, exc)

    def sockets(self) -> list[zmq.Socket]:
        sock = self.migration.peers.sock
        return [] if sock is None else [sock]

    def on_readable(self, sock: zmq.Socket) -> None:
        self.migration.peers.take()

    def close(self) -> None:
        self.migration.peers.close()

    # ---- slots ----------------------------------------------------------------------------
    @property
    def structurer(self) -> Structurer:
        """Built on first use (~0.5 s): plain chats never pay for it."""
        if self._structurer is None:
            self._structurer = Structurer(self.tokenizer)
        return self._structurer

    def place(self, seq: Sequence, kv: Restored | None) -> None:
        """A row with its KV joins the batch; one without goes to the prefill line (which may share a prefix)."""
        if kv is None:
            self.line.add(seq)
            return
        t0 = time.perf_counter()
        seq.logits = kv.logits
        self.join(seq, kv.layers)  # part of the switch: a kept state goes back into the engine's cache
        seq.switched(time.perf_counter() - t0)

    def build(self, run: M.Run) -> Sequence:
        """A request built from the daemon's record: its prompt, and the tokens already streamed replayed."""
        params, resume = run.params, run.resume_ids
        structured = params.structured
        if params.prompt is not None:  # a completion: the text as it is, no chat template
            prompt_ids = encode_prompt(self.tokenizer, params.prompt)
        elif structured:
            prompt_ids = self.render(*self.structurer.messages(params), params.template_kwargs)
        else:
            prompt_ids = self.render([as_text_message(m) for m in params.messages], None, params.template_kwargs)
        if self.max_context is not None and len(prompt_ids) >= self.max_context:
            raise P.ProtocolError(
                P.E_CONTEXT_LENGTH,
                f"the prompt is {len(prompt_ids)} tokens; the model's context holds {self.max_context}",
            )
        seq = Sequence(
            rid=run.rid,
            params=params,
            owner=run.owner,
            prompt_ids=prompt_ids,
            limit=self.max_context or 0,
            stream=TextStream(self.tokenizer, params.stop),
            replay=list(resume),
            constraint=self.structurer.constraint(params, resume) if structured else None,
        )
        for i, t in enumerate(resume):  # rebuild the detokenizer state silently
            seq.stream.push(t, stops=i + 1 >= seq.min_tokens)
        seq.generated = list(resume)
        seq.stream.emitted = min(run.emitted_chars, len(seq.stream.text))
        return seq

    def logprobs(self, seq: Sequence, token: int) -> dict:
        """The chosen token's logprob entry (and its ``top_logprobs``), from the logits it was chosen from."""
        return token_logprobs(seq.logits, token, seq.params.top_logprobs, self._piece)

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _release(self, seq: Sequence, keep: bool = True) -> State | None:
        """Take a slot's sequence out of the batch or the prefill line; return its state if asked."""
        if any(s is seq for s in self.rows()):
            return self.leave(seq, keep)
        if seq in self.line:
            self.line.remove(seq)
        if keep and seq.partial is not None and seq.logits is not None:
            return self.settle(seq.partial)
        self.drop_partial(seq.partial)
        seq.partial = None
        return None

    def fail(self, seq: Sequence, exc: Exception) -> None:
        self.running.pop(seq.rid, None)
        self._release(seq, keep=False)
        self.send(M.Failed(rid=seq.rid, code=P.E_INTERNAL, message=f"{type(exc).__name__}: {exc}"))

    def prefilled(self, tokens: int, seconds: float) -> None:
        """A prefill ran: count it, and let the cost model learn this machine's recompute speed."""
        self.prefill_tokens += tokens
        self.contexts.observe_prefill(tokens, seconds)

    # ---- decoding -------------------------------------------------------------------------
    def _decoding(self) -> bool:
        """The batch steps only when no row waits for the daemon's word on its quantum."""
        rows = self.rows()
        return len(rows) > 0 and not any(s.quantum.paused for s in rows)

    def _decode(self) -> None:
        """Choose each row's next token, stream it, then feed all continuing rows in one step."""
        going: dict[int, int] = {}
        greedy = greedy_rows(self._step_logits, self.rows())
        for seq in list(self.rows()):
            token = next_token(seq, greedy.get(seq.rid), self.eos_ids, self.without_eos)
            delta, reason = seq.advance(token, self.eos_ids)
            lp = [self.logprobs(seq, token)] if seq.params.logprobs else []
            self.outbox.tokens(seq.rid, token, delta, lp, first=len(seq.generated) == 1)
            if reason is None:
                going[seq.rid] = token
                continue
            state = self.leave(seq, keep=bool(seq.session) or bool(self.line.prefixes))
            self.running.pop(seq.rid, None)
            kept = self.sessions.keep(seq, state)
            if not kept and state is not None:
                self.line.keep_ended(seq, state)
            self._finish(seq, reason, kept=kept)
        if not going:
            self._step_logits = None
            self.outbox.flush()
            return
        t0 = time.perf_counter()
        rows, logits = self.forward(going)
        share = (time.perf_counter() - t0) / len(going)
        self.decode_tokens += len(going)
        self._step_logits = logits
        for i, seq in enumerate(rows):
            seq.quantum.charge(share)
            seq.quantum.count()
            seq.logits = logits[i : i + 1]
            seq.decode_computed += 1
        self.outbox.tick()
        for seq in quantum_ends(rows):
            # A token quantum stops the row until the daemon answers: exact, repeatable preemption points.
            # A time quantum is not exact anyway, so the row decodes on while the daemon decides: one row's
            # quantum end never stalls the whole batch for a round trip (or for a descheduled daemon).
            seq.quantum.end()
            self.send(
                M.QuantumEnd(
                    rid=seq.rid, emitted=len(seq.generated), prompt_tokens=len(seq.prompt_ids), prompt_reused=seq.reused
                )
            )

    def _finish(self, seq: Sequence, reason: str, kept: bool = False) -> None:
        self.running.pop(seq.rid, None)
        self.send(seq.finished(reason, kept))
