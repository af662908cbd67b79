"""A local engine's messages to the daemon, with a row's tokens coalesced into fewer messages.

One message per token made the daemon, the HTTP front and the client each handle every token
of every row in Python, and on a small machine their CPU is taken from the model's threads (on
2 cores a ``llama_decode`` waits for its slowest thread).  So a running row's tokens wait here
up to ``interval_s`` and leave together; its first token leaves at once (time to first token),
and any other message (a quantum end, a preemption, the end) first sends every token waiting,
so the daemon sees each row's messages in the order the engine made them.  The rows' tokens
flushed together travel in one message (``step_tokens``): one send, one receive and one
daemon loop turn per step rather than per row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from backends.engine import Send
from ipc import messages as M

STREAM_INTERVAL_S = 0.02  # the longest a streamed token waits for company (50 messages a second per row)


@dataclass
class _Pending:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)


class Outbox:
    def __init__(self, send: Send, interval_s: float = STREAM_INTERVAL_S):
        self._send = send
        self.interval_s = interval_s
        self.pending: dict[int, _Pending] = {}
        self.last = time.monotonic()

    def tokens(self, rid: int, token: int, text: str, logprobs: list, first: bool = False) -> None:
        """A row's new token; it leaves now if it is the row's first, else with the next flush."""
        p = self.pending.setdefault(rid, _Pending())
        p.ids.append(token)
        p.text += text
        p.logprobs += logprobs
        if first:
            self._send_tokens(rid, self.pending.pop(rid))

    def send(self, record: M.Message, frames: list | None = None) -> None:
        """Any other message: the tokens waiting go first."""
        self.flush()
        self._send(record, frames)

    def tick(self) -> None:
        """After a step: send what waited ``interval_s`` or more."""
        if self.pending and time.monotonic() - self.last >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        """Every row's waiting tokens, in one message (one row: a plain ``tokens``)."""
        if len(self.pending) == 1:
            ((rid, p),) = self.pending.items()
            self._send_tokens(rid, p)
        elif self.pending:
            rows = [_tokens(rid, p).encode() for rid, p in self.pending.items()]
            self._send(M.StepTokens(rows=rows))
        self.pending.clear()
        self.last = time.monotonic()

    def _send_tokens(self, rid: int, p: _Pending) -> None:
        self._send(_tokens(rid, p))


def _tokens(rid: int, p: _Pending) -> M.Tokens:
    return M.Tokens(rid=rid, ids=p.ids, text=p.text, logprobs=p.logprobs)
