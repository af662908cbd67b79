"""The llama.cpp engine: a GGUF model in one llama.cpp context, the rows of the batch its sequences.

The hooks of ``backends.local.LocalEngine`` on llama.cpp (``backends.llama_model``):

* a row's ``partial`` and its device-tier ``state`` are the same ``Slot``: its llama sequence id
  and the tokens it holds.  A preempted row leaves the batch and its cells stay where they are:
  the device tier costs no copy at all (the context manager holds the ``Slot`` as a
  ``contexts.resident.Resident``);
* the host form of a state (host tier, disk tier, migration frames) is one pair of tensors: the
  sequence's ``llama_state_seq_get_data`` bytes and its token count;
* ``forward`` is one ``llama_decode`` of one token per row; ``prefill_many`` one of several prompts.

Each sequence id has a stream of the cache of its own (``backends.llama_model``), so a
suspended sequence costs the running rows nothing; when a new row needs an id and none is
free, the least recently used suspended sequences are evicted to the host tier first
(``ContextManager.evict_device``).
The tokenizer is HuggingFace's, read from the GGUF itself (so grammars, the detokenizer and
the chat template are the HF engine's), cached beside the converted models.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from backends import chat
from backends.engine import Send
from backends.llama_model import KVFull, LlamaModel
from backends.local import LocalEngine, State
from backends.model_store import cache_root
from backends.seq_ids import packing
from backends.sequence import Sequence
from contexts.resident import Layers, Resident
from ipc import messages as M
from ipc.worker_spec import WorkerSpec

log = logging.getLogger("quantad.worker")


class Slot(Resident):
    """A sequence in llama.cpp's cache: its id and how many tokens it holds."""

    def __init__(self, model: LlamaModel, sid: int, tokens: int = 0):
        self.model, self.sid, self.tokens = model, sid, tokens

    @property
    def nbytes(self) -> int:
        return self.tokens * self.model.kv_bytes_per_token

    def evict(self) -> Layers:
        data = self.model.get_state(self.sid)
        n = self.tokens
        self.free()
        return [(data, torch.tensor([n], dtype=torch.int64))]

    def free(self) -> None:
        if self.sid is not None:
            self.model.release(self.sid, self.tokens)
            self.sid, self.tokens = None, 0


def load_tokenizer(gguf: Path) -> Any:
    """HuggingFace's tokenizer read from the GGUF (a few seconds), saved once beside the converted models."""
    cached = cache_root() / f"{gguf.stem}.tokenizer"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, cached)
    except OSError:  # another worker saved it first
        pass
    return tok


class LlamaCppEngine(LocalEngine):
    shares_prefixes = True  # its prefill line feeds a cut prompt's rest beside other rows (``forward``)

    def __init__(self, spec: WorkerSpec, send: Send, ctx: Any):
        gguf = Path(spec.model)
        self.model = LlamaModel(
            str(gguf), slots=spec.slots, ctx_size=spec.ctx_size, threads=spec.threads,
            batch=max(2048, spec.prefill_chunk + spec.slots), device=spec.device,
        )  # fmt: skip
        self.device = torch.device("cpu")  # state bytes live in host memory, wherever llama.cpp computes
        self.compute_device = spec.device
        self.tokenizer = load_tokenizer(gguf)
        self.eos_ids = self.model.eog_ids | ({self.tokenizer.eos_token_id} - {None})
        self.model_name = str(gguf)
        self.max_context = self.model.context_limit
        self.tokenizer_dir = str(cache_root() / f"{gguf.stem}.tokenizer")
        self._rows: list[Sequence] = []
        self._slots: dict[int, Slot] = {}  # the batch's rows' slots, by request id
        self.evictions = 0
        self.swaps = 0  # sequence ids exchanged to keep a step's rows side by side
        self._merged = False  # inside a step whose decode also feeds the prefill line
        super().__init__(spec, send, ctx)
        log.info(
            "event=llamacpp model=%s cells=%d seq_ids=%d threads=%d kv_bytes_per_token=%d",
            gguf.name, self.model.n_ctx, self.model.n_seq_max, self.model.threads, self.model.kv_bytes_per_token,
        )  # fmt: skip

    # ---- room in the cache ----------------------------------------------------------------
    def _room(self, ids: int) -> None:
        """Make room for ``ids`` new sequences (each has a stream of its own), evicting suspended ones (LRU)."""
        m = self.model

        def enough() -> bool:
            return len(m.free_ids) >= ids

        if not self._evict(enough):
            raise KVFull(f"all {m.n_seq_max} llama.cpp sequence ids are in use")

    def _evict(self, enough) -> bool:
        """Move suspended sequences out of the cache (LRU) until ``enough()``; tell the daemon where they went."""
        if enough():
            return True
        moves = self.contexts.evict_device(enough)
        self.evictions += len(moves)
        for mv in moves:
            if mv.key > 0:
                self.send(M.Context(rid=mv.key, tier=mv.tier, bytes=mv.nbytes))
        return enough()

    def _new_slot(self) -> Slot:
        self._room(ids=1)
        slot = Slot(self.model, -1)
        slot.sid = self.model.acquire(owner=slot)
        return slot

    def _pack(self, slots: list[Slot]) -> None:
        """Put the step's rows on consecutive sequence ids (one micro-batch: ``LlamaModel.swap``)."""
        m = self.model
        for a, b in packing({s.sid for s in slots}, m.n_seq_max, lambda i: getattr(m.owners.get(i), "tokens", 0)):
            m.swap(a, b)
            for sid in (a, b):
                if sid in m.owners:
                    m.owners[sid].sid = sid
            self.swaps += 1

    def _run(self, rows: list[tuple[Slot, list[int]]]) -> torch.Tensor:
        self._pack([s for s, _ in rows])
        logits = self.model.decode([(s.sid, s.tokens, t) for s, t in rows])
        for s, t in rows:
            s.tokens += len(t)
        return logits

    # ---- hooks ----------------------------------------------------------------------------
    def render(self, messages: list[dict], tools: list[dict] | None = None, extra: dict | None = None) -> list[int]:
        return chat.render(self.tokenizer, messages, tools, extra)

    def without_eos(self, logits: torch.Tensor) -> torch.Tensor:
        return chat.without_eos(logits, self.eos_ids)

    def prefill(self, ids: list[int], partial: Slot | None) -> tuple[Slot, torch.Tensor]:
        slot = self._new_slot() if partial is None else partial
        logits = None
        try:
            for i in range(0, len(ids), self.model.n_batch):
                logits = self._run([(slot, ids[i : i + self.model.n_batch])])
        except Exception:
            if partial is None:
                slot.free()
            raise
        return slot, logits

    def prefill_many(self, rows: list[list[int]]) -> list[tuple[State, torch.Tensor]]:
        slots: list[Slot] = []
        try:
            for _ in rows:
                slots.append(self._new_slot())
            logits = self._run(list(zip(slots, rows, strict=True)))
        except Exception:
            for s in slots:
                s.free()
            raise
        return [(s, logits[i : i + 1]) for i, s in enumerate(slots)]

    def settle(self, partial: Slot) -> Slot:
        return partial

    def drop_partial(self, partial: Any) -> None:
        if isinstance(partial, Slot):
            partial.free()

    def crop(self, state: Slot | Layers, n: int) -> Slot:
        slot = state if isinstance(state, Slot) else self._restored(state)
        self.model.crop(slot.sid, n, slot.tokens)
        slot.tokens = n
        return slot

    def fork(self, state: Slot | Layers) -> Slot:
        """Another sequence with the same cells: the state's bytes copied (at memcpy speed) into a new id."""
        return self._restored(self.keep_copy(state))

    def keep_copy(self, state: Slot | Layers) -> Layers:
        """The host form of a state (no sequence id held: those are few)."""
        if not isinstance(state, Slot):
            return state
        return [(self.model.get_state(state.sid), torch.tensor([state.tokens], dtype=torch.int64))]

    def kv_length(self, state: Slot | Layers) -> int:
        return state.tokens if isinstance(state, Slot) else int(state[0][1][0])

    def _restored(self, state: Layers) -> Slot:
        """A host-form state back in the cache, under a new sequence id."""
        ((data, count),) = state
        tokens = int(count[0])
        slot = self._new_slot()
        try:
            self.model.set_state(slot.sid, data, tokens)
        except Exception:
            self.model.release(slot.sid)
            raise
        slot.tokens = tokens
        return slot

    def join(self, seq: Sequence, state: Slot | Layers) -> None:
        self._slots[seq.rid] = state if isinstance(state, Slot) else self._restored(state)
        self._rows.append(seq)

    def leave(self, seq: Sequence, keep: bool) -> Slot | None:
        self._rows = [s for s in self._rows if s is not seq]
        slot = self._slots.pop(seq.rid)
        if keep:
            return slot
        slot.free()
        return None

    def rows(self) -> list[Sequence]:
        return self._rows

    def step(self) -> None:
        """A step with rows to decode feeds the prefill line's chunks in the same ``llama_decode`` (``forward``).

        ``--prefill-chunk`` bounds a step so that decoding rows keep streaming.  With none decoding,
        a step takes as much prefill as one ``llama_decode`` holds: in a burst, a chunk that left
        the first fill's last prompt to the next step kept that slot past the others' quanta, and the
        burst's last request waited a further step for it (~0.5 s of its first token).
        """
        if not self._decoding():
            super().step(self.model.n_batch)
            return
        self._merged = True
        try:
            self._decode_step()
        finally:
            self._merged = False

    def forward(self, tokens: dict[int, int]) -> tuple[list[Sequence], torch.Tensor]:
        rows = list(self._rows)
        batch = [(self._slots[s.rid], [tokens[s.rid]]) for s in rows]
        chunks = self._planned() if self._merged else []
        t0 = time.perf_counter()
        logits = self._run(batch + [(slot, ids) for _, slot, ids in chunks])
        if chunks:
            dt = time.perf_counter() - t0
            total = len(rows) + sum(len(ids) for _, _, ids in chunks)
            for i, (seq, slot, ids) in enumerate(chunks, start=len(rows)):
                seq.partial = slot  # its logits a copy: not a view of the decode rows' (``greedy_rows``)
                self.line.fed(seq, len(ids), logits[i : i + 1].clone(), dt * len(ids) / total)
        return rows, logits[: len(rows)]

    def _planned(self) -> list[tuple[Sequence, Slot, list[int]]]:
        """The prefill line's chunks for this step, each with its slot (a new one for a fresh row)."""
        out = []
        for seq, ids in self.line.plan():
            try:
                slot = seq.partial if seq.partial is not None else self._new_slot()
            except KVFull as exc:
                self.fail(seq, exc)
                continue
            seq.partial = slot
            out.append((seq, slot, ids))
        return out

    def batch_stats(self) -> dict[str, int]:
        m = self.model
        return {
            "kv_cells": m.n_ctx,
            "kv_cells_used": m.cells_in_use(),
            "kv_seq_ids_free": len(m.free_ids),
            "kv_evictions": self.evictions,
            "kv_id_swaps": self.swaps,
        }

    def close(self) -> None:
        super().close()
        self.model.close()
