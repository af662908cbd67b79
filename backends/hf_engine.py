"""The HuggingFace engine: a transformers causal LM (``backends.hf_model``) in one continuous batch.

The hooks of ``backends.local.LocalEngine`` on HuggingFace objects: a prefilling row's
``partial`` is its own ``DynamicCache``; a row's state is its (keys, values) per layer, and the
running rows share one left-padded batch cache (``backends.batch``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from backends.batch import Batch
from backends.engine import Send
from backends.hf_model import HFModel
from backends.local import LocalEngine, State
from backends.sequence import Sequence
from contexts.kv import build_cache, cache_layers
from ipc.worker_spec import WorkerSpec


class HFEngine(LocalEngine):
    def __init__(self, spec: WorkerSpec, send: Send, ctx: Any):
        self.model = HFModel(spec.model, spec.device, spec.dtype)
        self.device = self.model.device
        self.tokenizer = self.model.tokenizer
        self.eos_ids = self.model.eos_ids
        self.model_name = str(self.model.model.name_or_path)
        self.max_context = getattr(self.model.config, "max_position_embeddings", None)
        self.tokenizer_dir = str(spec.model)
        self.batch = Batch(self.model.model, self.model.config)
        super().__init__(spec, send, ctx)

    def render(self, messages: list[dict], tools: list[dict] | None = None, extra: dict | None = None) -> list[int]:
        return self.model.render(messages, tools, extra)

    def without_eos(self, logits: torch.Tensor) -> torch.Tensor:
        return self.model.without_eos(logits)

    def prefill(self, ids: list[int], partial: DynamicCache | None) -> tuple[DynamicCache, torch.Tensor]:
        return self.model.prefill(ids, partial)

    def prefill_many(self, rows: list[list[int]]) -> list[tuple[State, torch.Tensor]]:
        return self.model.prefill_many(rows)

    def settle(self, partial: DynamicCache) -> State:
        return cache_layers(partial)

    def crop(self, state: State, n: int) -> DynamicCache:
        return build_cache([(k[:, :, :n], v[:, :, :n]) for k, v in state], self.model.config)

    def join(self, seq: Sequence, state: State) -> None:
        self.batch.add(seq, state)

    def leave(self, seq: Sequence, keep: bool) -> State | None:
        return self.batch.remove(seq, keep)

    def rows(self) -> list[Sequence]:
        return self.batch.seqs

    def forward(self, tokens: dict[int, int]) -> tuple[list[Sequence], torch.Tensor]:
        return self.batch.step(tokens)

    def batch_stats(self) -> dict[str, int]:
        return {"batch_repacks": self.batch.repacks, "batch_swaps": self.batch.swaps}
