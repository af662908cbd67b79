"""A request is the daemon's process-table entry: all of one syscall's state in one object.

Its fields change only in its own methods and in the scheduler core (``scheduler.core``), as
in nano-vllm; the daemon and its handlers read them and call those.
"""

from __future__ import annotations

import dataclasses
import enum
import random
import time
from dataclasses import dataclass, field
from typing import Any

from ipc.chat_params import ChatParams
from ipc.protocol import MAX_TOKENS_LIMIT
from scheduler.programs import program_key, program_of


class State(enum.StrEnum):
    NEW = "NEW"
    READY = "READY"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL = (State.DONE, State.FAILED, State.CANCELLED)


def estimate_prompt_tokens(messages: list[dict[str, Any]], prompt: str | list[int] | None = None) -> int:
    """A prompt's length in tokens before any tokenizer saw it (the daemon has none).

    About 4 characters a token for English text, plus a few template tokens per message;
    policies use it until the worker reports the exact count.
    """
    if isinstance(prompt, list):
        return max(1, len(prompt))
    if isinstance(prompt, str):
        return max(1, (len(prompt) + 3) // 4)
    chars = sum(len(m.get("content") or "") for m in messages if isinstance(m, dict))
    return max(1, (chars + 3) // 4 + 5 * len(messages))


@dataclass
class Watch:
    """One connection following a request: what it has already been sent (tokens, characters)."""

    tokens: int = 0
    chars: int = 0
    stream: bool = True


@dataclass(eq=False)  # identity, not field by field: a run queue of thousands is searched by ``in``
class Request:
    """One chat syscall.  Holds what is needed to restart it from scratch on any worker."""

    pid: int
    agent_addr: bytes
    client_id: Any
    params: ChatParams  # a map (a journal's row, a test's) is read into the record
    state: State = State.NEW
    worker: str | None = None  # worker running it, or holding its context
    tier: str = "none"
    context_bytes: int = 0
    tokens: list[int] = field(default_factory=list)  # emitted ids (streamed to the agent)
    text: str = ""
    generated: int = 0  # tokens streamed: len(tokens), or as counted by workers that send no ids (API workers)
    preemptible: bool | None = None  # False: its worker cannot resume it, so it runs to the end of its turn
    checkpoint: int = 0  # tokens confirmed at the last quantum end
    quanta: int = 0
    preemptions: int = 0
    restarts: int = 0
    migrations: int = 0
    migrate_from: str | None = None  # worker exporting this request's context right now
    preempt_pending: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    since: float = field(default_factory=time.monotonic)
    wait_s: float = 0.0
    run_s: float = 0.0
    switch_s: float = 0.0
    first_token_s: float | None = None
    nice: int = 0  # -20..19, lower runs first (changed live by the ``nice`` op)
    prompt_tokens: int = 0  # estimated from the text at accept; exact once a worker reports it
    prompt_reused: int = 0  # of those, the ones a worker's cache held (reported with the exact count)
    started: bool = False  # dispatched at least once: its prompt counts as service received
    charged: float = 0.0  # service already accounted to the policy (weighted tokens)
    queue_s: float | None = None  # accept to first dispatch to a worker
    moved: dict[str, int] = field(default_factory=dict)  # context bytes saved into / restored from each tier
    owner: str = ""  # the identity that sent it (``scheduler.gate``): who may see, kill and renice it
    cost: int = 0  # tokens it may take (estimated prompt + max_tokens), counted against its owner's quota
    # who its events go to, by (routing id, the id they asked under): the agent that sent it, and any
    # that attached; none after a restart until its agent comes back (``attach``)
    watchers: dict[tuple[bytes, Any], Watch] = field(default_factory=dict)
    recovered: bool = False  # taken back from a dead daemon's journal
    logprobs: list = field(default_factory=list)  # per token, when asked for (None where a restart lost one)
    program: str = ""  # the agent program it belongs to (``scheduler.programs``): fixed at accept
    stored: bool = False  # a stored response (Responses API) waits for its end

    def __post_init__(self) -> None:
        self.params = ChatParams.of(self.params)
        if self.params.seed is None:  # fixed now, so any restart samples the same stream
            self.params = dataclasses.replace(self.params, seed=random.getrandbits(63))
        self.nice = self.params.nice
        if not self.prompt_tokens:
            self.prompt_tokens = estimate_prompt_tokens(self.params.messages, self.params.prompt)
        if not self.watchers:
            self.watchers[(self.agent_addr, self.client_id)] = Watch(stream=self.stream)
        if not self.program:
            self.program = program_of(self.params)
        if not self.cost:  # fixed at accept: what its owner's quota was charged, and is given back
            self.cost = self.prompt_tokens + (self.max_tokens or MAX_TOKENS_LIMIT)

    @property
    def program_key(self) -> str:
        """Its program as policies count it: within its owner's namespace."""
        return program_key(self.owner, self.program)

    @property
    def agent(self) -> str:
        return self.params.agent

    @property
    def session(self) -> str:
        return self.params.session

    @property
    def stream(self) -> bool:
        """Whether the agent asked for ``token``, ``preempted`` and ``resumed`` events."""
        return self.params.stream

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    def move(self, state: State) -> None:
        """Change state, charging the time spent in the old one to wait or run."""
        now = time.monotonic()
        if self.state in (State.NEW, State.READY):
            self.wait_s += now - self.since
        elif self.state is State.RUNNING:
            self.run_s += now - self.since
        if state is State.RUNNING and self.queue_s is None:
            self.queue_s = now - self.submitted_at
        self.state, self.since = state, now

    def note_moved(self, tier: str, nbytes: int) -> None:
        """Count context bytes a switch moved into or out of ``tier``."""
        self.moved[tier] = self.moved.get(tier, 0) + max(int(nbytes), 0)

    def note_context(self, tier: str, nbytes: int) -> None:
        """Its worker saved the context into ``tier`` (a preemption, or a move under memory pressure)."""
        self.tier, self.context_bytes = tier, nbytes
        self.note_moved(tier, nbytes)

    def note_output(self, ids: list[int], text: str, count: int, logprobs: list | None = None) -> None:
        """Tokens streamed by its worker: ids (local engines) and/or text, ``count`` of them."""
        if self.first_token_s is None and (ids or text):
            self.first_token_s = time.monotonic() - self.submitted_at
        if self.params.logprobs and count:  # one entry per token, aligned with ``generated``
            done = len(self.tokens) if ids else self.generated  # API workers send counted text, no ids
            self.logprobs.extend([None] * (done - len(self.logprobs)))
            del self.logprobs[done:]
            self.logprobs.extend((list(logprobs or []) + [None] * count)[:count])
        self.tokens.extend(ids)
        self.generated += count
        self.text += text

    def recover(self) -> None:
        """Taken back from the journal: nobody follows it until its agent attaches again."""
        self.recovered = True
        self.watchers.clear()

    def mark_stored(self) -> None:
        """A stored response (Responses API) runs on it: its end is written there too."""
        self.stored = True

    def detach(self) -> None:
        """A background request: it runs for nobody (its agent's going does not cancel it) until one attaches."""
        self.watchers.clear()

    def watch(self, addr: bytes, cid: Any, tokens: int, chars: int, stream: bool) -> None:
        """``addr`` follows it under ``cid``, having ``tokens`` / ``chars`` of its output (never less than sent)."""
        old = self.watchers.get((addr, cid))
        if old is not None:
            tokens, chars = max(tokens, old.tokens), max(chars, old.chars)
        self.watchers[(addr, cid)] = Watch(tokens, chars, stream)

    def unwatch(self, addr: bytes) -> bool:
        """``addr`` is gone; True when that leaves nobody following a request that had someone."""
        keys = [k for k in self.watchers if k[0] == addr]
        for k in keys:
            del self.watchers[k]
        return bool(keys) and not self.watchers

    def unsent(self, w: Watch) -> tuple[str, list[int]] | None:
        """Output ``w`` has not been sent yet (text, ids), marked as sent; None when there is none.

        After a restart the output is recomputed from the last checkpoint: the same tokens again,
        so what a watcher already has is skipped by its counts, not sent twice.
        """
        if self.generated < w.tokens:
            return None
        text, ids = self.text[w.chars :], self.tokens[w.tokens :]
        if not text and not ids and self.generated == w.tokens:
            return None
        w.tokens, w.chars = self.generated, max(w.chars, len(self.text))
        return text, ids

    def take_service(self, total: float) -> float:
        """Mark ``total`` service as charged to the policy; returns the part not charged before."""
        delta, self.charged = total - self.charged, total
        return delta

    def stats(self) -> dict[str, Any]:
        return {
            "quanta": self.quanta,
            "preemptions": self.preemptions,
            "restarts": self.restarts,
            "migrations": self.migrations,
            "wait_s": round(self.wait_s, 6),
            "run_s": round(self.run_s, 6),
            "context_switch_s": round(self.switch_s, 6),
            "ttft_s": None if self.first_token_s is None else round(self.first_token_s, 6),
            "total_s": round(time.monotonic() - self.submitted_at, 6),
            "queue_s": None if self.queue_s is None else round(self.queue_s, 6),
            "context_bytes_moved": dict(self.moved),
            "owner": self.owner,
        }

    def row(self) -> dict[str, Any]:
        """The ``ps`` line of this request."""
        return {
            "pid": self.pid,
            "agent": self.agent,
            "owner": self.owner,
            "session": self.session,
            "program": self.program,
            "state": self.state.value,
            "nice": self.nice,
            "worker": self.worker,
            "quanta": self.quanta,
            "tokens": self.generated,
            "preemptible": self.preemptible,
            "checkpoint": self.checkpoint,
            "context": self.tier,
            "context_bytes": self.context_bytes,
            "age_s": round(time.monotonic() - self.submitted_at, 3),
        }
