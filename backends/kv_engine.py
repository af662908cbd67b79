"""What the engine's helpers (prefill line, adoption, migration, sessions) may ask of a local engine.

A protocol, so the helpers depend on this list and not on ``backends.local``, which owns them:
no file imports the file that imports it, and what a helper may touch is written down here.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
import zmq

from backends.engine import Send
from backends.hooks import State
from backends.sequence import Sequence
from contexts.manager import ContextManager
from ipc import messages as M
from ipc.worker_spec import WorkerSpec


class Restored(NamedTuple):
    """A row's KV and last logits, found somewhere (a snapshot, an adopted file, a migration): it joins the
    batch as it is.  A source that found none answers ``None``: the row goes to the prefill line."""

    layers: State
    logits: torch.Tensor


class Line(Protocol):
    """The prefill line, as the helpers see it."""

    def add(self, seq: Sequence) -> None: ...

    def remove(self, seq: Sequence) -> None: ...

    def __contains__(self, seq: Sequence) -> bool: ...


class KvEngine(Protocol):
    send: Send  # to the daemon
    spec: WorkerSpec
    ctx: zmq.Context
    contexts: ContextManager
    line: Line
    model_name: str
    device: Any

    def build(self, run: M.Run) -> Sequence: ...

    def fail(self, seq: Sequence, exc: Exception) -> None: ...

    def prefilled(self, tokens: int, seconds: float) -> None: ...

    # the model's hooks (``backends.hooks.ModelHooks``) the helpers use
    def prefill(self, ids: list[int], partial: Any) -> tuple[Any, torch.Tensor]: ...

    def prefill_many(self, rows: list[list[int]]) -> list[tuple[State, torch.Tensor]]: ...

    def settle(self, partial: Any) -> State: ...

    def drop_partial(self, partial: Any) -> None: ...

    def crop(self, state: State, n: int) -> Any: ...

    def fork(self, state: State) -> State: ...

    def keep_copy(self, state: State) -> State: ...

    def kv_length(self, state: State) -> int: ...

    def join(self, seq: Sequence, state: State) -> None: ...
