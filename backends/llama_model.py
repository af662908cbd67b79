"""llama.cpp through llama-cpp-python's low-level API: one context whose KV cache holds many sequences.

The llama.cpp engine's model (``backends.llamacpp_engine``).  Every sequence is a llama
sequence id in one context (``n_seq_max`` of them): a batch of rows is one ``llama_decode``
over a ``llama_batch`` with one token per row (or a chunk of prompt per row), a suspended
sequence just stays in the cache under its id, and its state moves out and back in as the
bytes of ``llama_state_seq_get_data`` / ``set_data``.

Each sequence id has a stream of its own (``kv_unified`` off, as llama-server runs its slots):
``n_ctx / n_seq_max`` cells, its attention spanning its own cells only.  In one unified cache
every row's attention spans every used cell of every sequence, suspended ones included: 16 rows
beside 16 suspended sequences decoded at 167.6 tok/s unified and 238.4 with streams (measured
here), and a suspended sequence in its own stream costs the running rows nothing.

Flash attention stays on (llama.cpp's default on the CPU): with it a row's single-token decode
computes the same bits wherever its cells lie in the cache (measured: a sequence placed after
1, 3, 37 or 256 cells of another, or interleaved with one, decodes identically), so a state
restored at another place continues exactly.  Without it the result depends on the cells'
offsets.  Batched decodes of several rows differ from single ones at near-ties (llama.cpp's
batched kernels round differently): ``benchmarks/exactness.py`` measures how often.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

import numpy as np
import torch

from ipc.worker_spec import LLAMA_SEQ_CTX, llama_seq_ids

log = logging.getLogger("quantad.worker")


class KVFull(RuntimeError):
    """The cache has no room for the tokens a decode would add."""


def _quiet(level: int, text: bytes, user: ctypes.c_void_p) -> None:
    """llama.cpp's log, at warning level and above only (it prints every tensor it loads)."""
    if level in (3, 4):  # GGML_LOG_LEVEL_WARN, _ERROR (not CONT: the rest of a line)
        log.warning("llama.cpp: %s", text.decode(errors="replace").rstrip())


class LlamaModel:
    def __init__(self, gguf: str, *, slots: int, ctx_size: int = 0, threads: int = 0, batch: int = 2048,
                 device: str = "cpu"):  # fmt: skip
        import llama_cpp as L

        self.L = L
        self._log_cb = L.llama_log_callback(_quiet)  # kept alive: llama.cpp holds the pointer
        L.llama_log_set(self._log_cb, None)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0 if device == "cpu" else 999
        self.model = L.llama_model_load_from_file(os.fsencode(gguf), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {gguf}")
        self.n_ctx_train = int(L.llama_model_n_ctx_train(self.model))
        self.n_seq_max = llama_seq_ids(slots)
        self.n_batch = max(batch, slots)
        threads = threads or os.cpu_count() or 1
        cp = L.llama_context_default_params()
        cp.n_ctx = ctx_size or LLAMA_SEQ_CTX * self.n_seq_max
        cp.n_batch, cp.n_seq_max, cp.kv_unified = self.n_batch, self.n_seq_max, False
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp cannot make a context of {cp.n_ctx} cells")
        self.n_ctx = int(L.llama_n_ctx(self.ctx))
        self.seq_cells = int(L.llama_n_ctx_seq(self.ctx))  # each sequence id's own stream
        self.threads = threads
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.free_ids = list(range(self.n_seq_max - 1, -1, -1))  # sequence ids not in use (pop: the lowest)
        self.owners: dict[int, Any] = {}  # each id in use -> what holds it (the engine's ``Slot``)
        self.held = 0  # cells the sequences we hold take (our own count; ``cells_in_use`` asks llama.cpp)
        self.kv_bytes_per_token = self._kv_bytes_per_token()

    @property
    def eog_ids(self) -> set[int]:
        """Tokens that end a generation, as llama.cpp's vocabulary marks them."""
        return {t for t in range(self.n_vocab) if self.L.llama_vocab_is_eog(self.vocab, t)}

    @property
    def context_limit(self) -> int:
        """The most tokens one sequence may hold: its stream of the cache, and the model's trained window."""
        return min(self.seq_cells, self.n_ctx_train) if self.n_ctx_train > 0 else self.seq_cells

    def _kv_bytes_per_token(self) -> int:
        """K and V bytes of one token (for the budgets), from a one-token state of sequence 0."""
        sid = self.acquire()
        try:
            self.decode([(sid, 0, [0])])
            one = int(self.L.llama_state_seq_get_size(self.ctx, sid))
            self.decode([(sid, 1, [0])])
            return int(self.L.llama_state_seq_get_size(self.ctx, sid)) - one
        finally:
            self.release(sid)
            self.held = 0

    # ---- sequences ------------------------------------------------------------------------
    def acquire(self, owner: Any = None) -> int:
        """The lowest free sequence id, held for ``owner`` (``swap`` moves owners with their cells)."""
        if not self.free_ids:
            raise KVFull(f"all {self.n_seq_max} llama.cpp sequence ids are in use")
        sid = self.free_ids.pop()
        self.owners[sid] = owner
        return sid

    def release(self, sid: int, tokens: int = 0) -> None:
        """Free a sequence's cells and its id."""
        self.L.llama_memory_seq_rm(self.mem, sid, -1, -1)
        self.held -= tokens
        self.owners.pop(sid, None)
        self.free_ids.append(sid)
        self.free_ids.sort(reverse=True)

    def swap(self, a: int, b: int) -> None:
        """Exchange what ids ``a`` and ``b`` hold (either may be free): cells, through state bytes, and owners.

        A decode splits its rows into one micro-batch per run of consecutive sequence ids
        (llama.cpp's ``split_equal`` with a stream per id accepts only ``last + 1``): eight rows on
        ids 0, 2, ..., 14 decoded at 92 ms a step here, on ids 0-7 at 42 ms.  The engine swaps rows
        next to each other before a step (``seq_ids.packing``); the bytes are exact, as for the host tier.
        """
        L, mem = self.L, self.mem
        da = self.get_state(a) if L.llama_memory_seq_pos_max(mem, a) >= 0 else None
        db = self.get_state(b) if L.llama_memory_seq_pos_max(mem, b) >= 0 else None
        L.llama_memory_seq_rm(mem, a, -1, -1)
        L.llama_memory_seq_rm(mem, b, -1, -1)
        held = self.held
        if da is not None:
            self.set_state(b, da, 0)
        if db is not None:
            self.set_state(a, db, 0)
        self.held = held
        free_a, free_b = a not in self.owners, b not in self.owners
        oa, ob = self.owners.pop(a, None), self.owners.pop(b, None)
        if not free_a:
            self.owners[b] = oa
        if not free_b:
            self.owners[a] = ob
        if free_a != free_b:
            self.free_ids.remove(a if free_a else b)
            self.free_ids.append(b if free_a else a)
            self.free_ids.sort(reverse=True)

    def crop(self, sid: int, keep: int, tokens: int) -> None:
        """Keep the first ``keep`` of the sequence's ``tokens`` cells."""
        if not self.L.llama_memory_seq_rm(self.mem, sid, keep, -1):
            raise RuntimeError(f"llama.cpp cannot crop sequence {sid} to {keep} tokens")
        self.held -= tokens - keep

    def cells_in_use(self) -> int:
        """Cells every sequence holds, as llama.cpp itself reports them (tests prove nothing leaks)."""
        L, n = self.L, 0
        for sid in range(self.n_seq_max):
            hi = L.llama_memory_seq_pos_max(self.mem, sid)
            if hi >= 0:
                n += hi - L.llama_memory_seq_pos_min(self.mem, sid) + 1
        return n

    # ---- state bytes ----------------------------------------------------------------------
    def get_state(self, sid: int) -> torch.Tensor:
        """The sequence's state (its KV cells) as bytes of our own."""
        size = int(self.L.llama_state_seq_get_size(self.ctx, sid))
        out = torch.empty(size, dtype=torch.uint8)
        n = self.L.llama_state_seq_get_data(self.ctx, _ptr(out), size, sid)
        if n != size:
            raise RuntimeError(f"llama.cpp wrote {n} of {size} state bytes of sequence {sid}")
        return out

    def set_state(self, sid: int, data: torch.Tensor, tokens: int) -> None:
        """Load state bytes into an empty sequence id."""
        data = data.contiguous()
        n = self.L.llama_state_seq_set_data(self.ctx, _ptr(data), data.numel(), sid)
        if n != data.numel():
            self.L.llama_memory_seq_rm(self.mem, sid, -1, -1)
            raise ValueError(f"llama.cpp rejected a {data.numel()}-byte state (read {n})")
        self.held += tokens

    # ---- compute --------------------------------------------------------------------------
    def decode(self, rows: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """One ``llama_decode``: each row (sequence id, first position, tokens); each row's last logits [R, vocab]."""
        b, n = self.batch, 0
        order = sorted(range(len(rows)), key=lambda i: rows[i][0])  # ascending ids: one micro-batch per run
        for sid, pos, tokens in (rows[i] for i in order):
            for i, t in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n] = t, pos + i, 1
                b.seq_id[n][0] = sid
                b.logits[n] = i == len(tokens) - 1
                n += 1
        if n > self.n_batch:
            raise ValueError(f"{n} tokens in one decode, the batch holds {self.n_batch}")
        for sid, pos, tokens in rows:
            if pos + len(tokens) > self.seq_cells:
                raise KVFull(f"sequence {sid} would hold {pos + len(tokens)} tokens, its stream {self.seq_cells}")
        b.n_tokens = n
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise KVFull(f"llama_decode found no room ({rc})") if rc == 1 else RuntimeError(f"llama_decode: {rc}")
        self.held += n
        out = np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(len(rows), self.n_vocab))
        back = np.empty(len(rows), dtype=np.int64)
        back[order] = np.arange(len(rows))
        return torch.from_numpy(out[back])

    def close(self) -> None:
        L = self.L
        if self.ctx:
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)
            self.ctx = self.model = None


def _ptr(t: torch.Tensor):
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_ubyte))
