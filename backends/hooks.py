"""What a logits-based engine implements for ``backends.local.LocalEngine``: its model's hooks.

A row's model state travels between the hooks in two forms: ``partial`` (the engine's own
running form while a row prefills, e.g. a ``DynamicCache`` or a llama.cpp sequence) and
``state`` (the snapshot form: a list of (keys, values) tensor pairs, or a
``contexts.resident.Resident`` the engine still holds).  Logits are torch tensors, one row
[1, vocab] each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from backends.sequence import Sequence

State = list[tuple[torch.Tensor, torch.Tensor]]  # a row's model state in snapshot form


class ModelHooks(ABC):
    """The model side of a local engine: set the attributes, implement the abstract methods."""

    device: torch.device  # where the model's tensors are (the context manager's device tier)
    tokenizer: Any  # a HuggingFace-compatible tokenizer: ``decode`` (detokenizer), chat template (grammars)
    eos_ids: set[int]  # tokens that end a request
    model_name: str  # what ``ready`` reports
    max_context: int | None = None  # the most tokens a request's context may hold (None: not checked)

    @abstractmethod
    def render(self, messages: list[dict], tools: list[dict] | None = None, extra: dict | None = None) -> list[int]:
        """Token ids of a chat, with the generation prompt (``extra``: more variables for the template)."""

    @abstractmethod
    def without_eos(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of ``logits`` in which no end-of-sequence token can be chosen (``min_tokens``)."""

    @abstractmethod
    def prefill(self, ids: list[int], partial: Any) -> tuple[Any, torch.Tensor]:
        """Feed ``ids`` after what ``partial`` holds (None: a new row); return it and the last logits."""

    def prefill_many(self, rows: list[list[int]]) -> list[tuple[State, torch.Tensor]]:
        """Prefill several fresh prompts (in one forward, where the engine can); each row's state and logits."""
        out = []
        for ids in rows:
            partial, logits = self.prefill(ids, None)
            out.append((self.settle(partial), logits))
        return out

    @abstractmethod
    def settle(self, partial: Any) -> State:
        """A prefilled row's state, to ``join`` the batch or to snapshot."""

    def drop_partial(self, partial: Any) -> None:  # noqa: B027 (optional: HF has nothing to free)
        """A prefilling row's ``partial`` is abandoned (llama.cpp: free its cells; HF: garbage)."""

    @abstractmethod
    def crop(self, state: State, n: int) -> Any:
        """A kept state cut to its first ``n`` tokens, as a ``partial`` to prefill on (sessions)."""

    def fork(self, state: State) -> State:
        """A copy of a prefilled row's state (or of a kept copy) for another row that shares its prompt."""
        return [(k.clone(), v.clone()) for k, v in state]

    def keep_copy(self, state: State) -> State:
        """A copy of a prefilled row's state that holds nothing of the engine's (kept for late forks)."""
        return self.fork(state)

    def kv_length(self, state: State) -> int:
        """Tokens of context a state holds."""
        return int(state[0][0].shape[-2])

    @abstractmethod
    def join(self, seq: Sequence, state: State) -> None:
        """The row joins the batch with this state, from the next ``forward`` on."""

    @abstractmethod
    def leave(self, seq: Sequence, keep: bool) -> State | None:
        """The row leaves the batch; its state (tensors of its own) when ``keep``."""

    @abstractmethod
    def rows(self) -> list[Sequence]:
        """The batch's rows, in the order the next ``forward`` runs them."""

    @abstractmethod
    def forward(self, tokens: dict[int, int]) -> tuple[list[Sequence], torch.Tensor]:
        """Feed one token per row (by request id); the rows in order and their next-token logits [B, vocab]."""

    def batch_stats(self) -> dict[str, int]:
        """The engine's own heartbeat figures (HF: re-packs and swaps of the batch's KV)."""
        return {}
