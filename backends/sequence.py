"""A worker's per-request state: one object that holds it all and derives the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from backends.detok import TextStream

QUANTUM_ROUNDING = 0.25  # the share of a time quantum a row may give up to end it with others (see worker)


@dataclass
class Sequence:
    rid: int
    params: dict[str, Any]
    prompt_ids: list[int]
    stream: TextStream
    constraint: Any = None  # backends.structured.Constraint: grammar state, part of the snapshot
    generated: list[int] = field(default_factory=list)
    replay: list[int] = field(default_factory=list)  # ids already emitted before a restart
    cache: DynamicCache | None = None
    logits: torch.Tensor | None = None
    quantum_tokens: int | None = None
    quantum_ms: float | None = None
    quantum_used: int = 0
    quantum_spent_s: float = 0.0  # this quantum's share of the worker's compute (see ``charge``)
    paused: bool = False  # token quantum over: stopped, waiting for the scheduler's word
    asked: bool = False  # time quantum over: the scheduler was asked, the row decodes on meanwhile
    prefilled: int = 0  # tokens of ``context_ids`` already in ``cache`` (chunked prefill)
    prefill_computed: int = 0  # prompt (and replayed) tokens this request pushed through the model
    decode_computed: int = 0
    reused: int = 0  # prompt tokens whose KV came from the agent's session
    restores: int = 0
    switch_s: float = 0.0

    @property
    def seed(self) -> int:
        return int(self.params.get("seed") or 0)

    @property
    def context_ids(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def session(self) -> str:
        return str(self.params.get("session") or "")

    @property
    def min_tokens(self) -> int:
        """Tokens to generate before EOS and stop strings may end the request (0: none)."""
        return int(self.params.get("min_tokens") or 0)

    @property
    def remaining(self) -> int:
        return int(self.params["max_tokens"]) - len(self.generated)

    def new_quantum(self, tokens: int | None, ms: float | None) -> None:
        self.quantum_tokens, self.quantum_ms = tokens, ms
        self.quantum_used, self.quantum_spent_s, self.paused, self.asked = 0, 0.0, False, False

    def charge(self, seconds: float) -> None:
        """Count compute time against the time quantum: a batched step of B rows charges each row 1/B of it.

        As an OS charges a time slice in CPU time used, not in time spent resident: a row in a full
        batch gets a token per step but uses only its share of the step, so a quantum of wall-clock
        residency would shrink with the batch and switch contexts every step or two.
        """
        self.quantum_spent_s += seconds

    def quantum_nearly_over(self) -> bool:
        """A time quantum (only) with at most ``QUANTUM_ROUNDING`` of it left: it may end with another's."""
        if self.quantum_tokens is not None or self.quantum_ms is None:
            return False
        return self.quantum_spent_s * 1000.0 >= (1.0 - QUANTUM_ROUNDING) * self.quantum_ms

    def quantum_over(self) -> bool:
        if self.quantum_tokens is not None and self.quantum_used >= self.quantum_tokens:
            return True
        if self.quantum_ms is not None:
            return self.quantum_spent_s * 1000.0 >= self.quantum_ms
        return False
