"""A local engine's per-request state: one object that holds it all and derives the rest.

It is the ``meta`` of the request's context snapshot, so everything here (generated ids,
detokenizer, grammar state, counters) survives a preemption at any tier; the model's state
(KV) lives beside it in the snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from backends.detok import TextStream
from backends.quantum import QuantumMeter
from backends.structured import parse_tool_calls
from ipc import messages as M
from ipc.chat_params import ChatParams


@dataclass(eq=False)
class Sequence:
    rid: int
    params: ChatParams
    prompt_ids: list[int]
    stream: TextStream
    owner: str = ""  # the identity it runs for: what it leaves in the prefix cache is that identity's only
    limit: int = 0  # the most tokens the context may hold (the model's context; 0: no limit)
    constraint: Any = None  # backends.structured.Constraint: grammar state, part of the snapshot
    generated: list[int] = field(default_factory=list)
    replay: list[int] = field(default_factory=list)  # ids already emitted before a restart
    partial: Any = None  # the engine's own state of a row still prefilling (HF: a DynamicCache)
    logits: torch.Tensor | None = None  # the next token's, when the row has them (no forward pass needed)
    quantum: QuantumMeter = field(default_factory=QuantumMeter)
    prefilled: int = 0  # tokens of ``context_ids`` already in ``partial`` (chunked prefill)
    prefill_computed: int = 0  # prompt (and replayed) tokens this request pushed through the model
    decode_computed: int = 0
    reused: int = 0  # prompt tokens whose KV came from the agent's session
    restores: int = 0
    switch_s: float = 0.0

    @property
    def seed(self) -> int:
        return self.params.seed or 0

    @property
    def context_ids(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def session(self) -> str:
        return self.params.session

    @property
    def min_tokens(self) -> int:
        """Tokens to generate before EOS and stop strings may end the request (0: none)."""
        return self.params.min_tokens

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.generated)

    @property
    def under_min(self) -> bool:
        """No end-of-sequence yet: under ``min_tokens``, or never (``ignore_eos``)."""
        return len(self.generated) < self.min_tokens or self.params.ignore_eos

    # ---- what the engine's helpers may change (the engine and its prefill line write fields) ----
    def switched(self, seconds: float, restored: bool = False) -> None:
        """Time spent taking its context out or putting it back; ``restored``: one more comeback."""
        self.switch_s += seconds
        self.restores += restored

    def head_start(self, partial: Any, tokens: int) -> None:
        """Prefill from a kept state that already holds the first ``tokens`` of its context."""
        self.partial, self.prefilled, self.reused = partial, tokens, tokens

    def from_scratch(self) -> None:
        """Its KV is gone (the recompute tier): prompt and generated tokens are fed again."""
        self.partial, self.logits, self.prefilled = None, None, 0

    def carried_over(self, carried: M.Carried) -> None:
        """The counts it had on the worker it migrated from."""
        self.prefill_computed, self.decode_computed = carried.prefill_computed, carried.decode_computed
        self.restores, self.reused, self.switch_s = carried.restores, carried.reused, carried.switch_s

    def advance(self, token: int, eos_ids: set[int]) -> tuple[str, str | None]:
        """Take the chosen token: the text now safe to stream, and why the request ends here (None: it goes on)."""
        self.generated.append(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        delta, stopped = self.stream.push(token, stops=len(self.generated) >= self.min_tokens)
        reason = None
        if stopped or token in eos_ids or (self.constraint is not None and self.constraint.done):
            reason = "stop"
        elif self.remaining <= 0 or (self.limit and len(self.prompt_ids) + len(self.generated) >= self.limit):
            reason = "length"
        if reason is not None and not stopped:
            delta += self.stream.flush()
        return delta, reason

    def over(self, eos_ids: set[int]) -> str | None:
        """Why a restarted request is already over (its last token came before its ``finished`` got out)."""
        if not self.generated:
            return None
        if self.generated[-1] in eos_ids or self.stream.stopped:
            return "stop"
        return "length" if self.remaining <= 0 else None

    def finished(self, reason: str, kept: bool = False) -> M.Finished:
        if self.constraint is not None and self.constraint.closed_early:
            reason = "length"  # valid JSON, but the budget ended it (OpenAI's convention for a cut output)
        content, calls = parse_tool_calls(self.stream.text, self.params.tools, self.rid)
        if not self.params.parallel_tool_calls:
            calls = calls[:1]
        return M.Finished(
            rid=self.rid,
            finish_reason="tool_calls" if calls else reason,
            session_kept=kept,
            content=content,
            tool_calls=calls,
            usage={
                "prompt_tokens": len(self.prompt_ids),
                "completion_tokens": len(self.generated),
                "total_tokens": len(self.prompt_ids) + len(self.generated),
            },
            stats={
                "prompt_tokens_computed": self.prefill_computed,
                "prompt_tokens_reused": self.reused,
                "decode_tokens_computed": self.decode_computed,
                "restores": self.restores,
                "worker_switch_s": round(self.switch_s, 6),
                **({} if self.constraint is None else self.constraint.report()),
            },
        )
