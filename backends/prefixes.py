"""Shared prefixes and whole conversations: states recently computed, kept so that a new prompt starting
the same way prefills only the rest.

Requests to one model mostly start alike (the chat template's system turn, an agent's
instructions), and agents resend their whole conversation every turn.  So each prompt a worker
prefills, and each request's whole context when it ends (prompt and answer: the next turn starts
with it), is kept here as the host form of its state (``keep_copy``: on llama.cpp the sequence's
state bytes), with its last logits, LRU within one byte budget (llama-server's ``--cache-ram``).
A new prompt starts from the entry it shares the longest prefix with: the state copied into a
new sequence and cut to that prefix (``fork``, ``crop``), or, when the whole prompt matches an
entry of exactly its length, joins the batch at once with the entry's logits (nothing computed,
the same bits as the first).  Entries belong to the identity whose request made them: no
identity reuses (or times) another's.  llama-server reuses a slot's previous context the same
way; vLLM shares blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIN_SHARED = 16  # a shorter common prefix is not worth a state copy
GIB = 1 << 30


def auto_budget(available: int) -> int:
    """llama-server's ``--cache-ram`` default here: the smaller of 8 GiB and a quarter of the available memory."""
    return min(8 * GIB, available // 4)


def common_prefix(a, b) -> int:
    """How many leading tokens two id sequences share."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


@dataclass
class Prefix:
    ids: np.ndarray
    state: Any  # the host form of the state (holds nothing of the engine's)
    logits: Any  # the next token's logits after ``ids`` [1, vocab]
    nbytes: int
    owner: str = ""  # the identity whose request computed it
    prompt: int = 0  # of ``ids``, the tokens of the prompt (the rest: its answer, for an ended request's entry)

    def whole(self, n: int) -> bool:
        """Whether a prompt of ``n`` tokens sharing all of them is this very entry (its logits serve)."""
        return n == len(self.ids) and self.logits is not None


@dataclass
class PrefixCache:
    budget: int  # bytes of kept states
    entries: OrderedDict[tuple[str, tuple[int, ...]], Prefix] = field(default_factory=OrderedDict)
    used: int = 0
    hits: int = 0
    tokens_reused: int = 0
    conversations: int = 0  # entries offered by ended requests (prompt and answer)

    def __bool__(self) -> bool:
        return self.budget > 0

    def longest(self, ids: list[int], owner: str = "") -> tuple[int, Prefix | None]:
        """The caller's entry sharing the longest prefix with ``ids``, and how many tokens it shares.

        Of entries sharing as much, one of exactly that length wins: its logits spare the last token.
        """
        want = np.asarray(ids, dtype=np.int64)
        best, best_n, best_whole = None, 0, False
        for key, entry in self.entries.items():
            if entry.owner != owner:
                continue
            common = common_prefix(entry.ids, want)
            whole = common == len(want) and entry.whole(common)
            if common > best_n or (common == best_n and whole and not best_whole):
                best, best_n, best_whole = key, common, whole
        if best is None or best_n < MIN_SHARED:
            return 0, None
        self.entries.move_to_end(best)
        self.hits += 1
        return best_n, self.entries[best]

    def offer(self, ids: list[int], state: Any, logits: Any, owner: str = "", prompt: int | None = None) -> None:
        """Keep a state (a copy the caller made) for the ids it covers, evicting the least recently used."""
        nbytes = sum(t.numel() * t.element_size() for pair in state for t in pair)
        key = (owner, tuple(ids))
        if nbytes > self.budget or len(ids) < MIN_SHARED:
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.used -= old.nbytes
        while self.entries and self.used + nbytes > self.budget:
            self.used -= self.entries.popitem(last=False)[1].nbytes
        prompt = len(ids) if prompt is None else prompt
        self.entries[key] = Prefix(np.asarray(ids, dtype=np.int64), state, logits, nbytes, owner, prompt)
        self.used += nbytes

    def stats(self) -> dict[str, int]:
        return {
            "prefix_entries": len(self.entries),
            "prefix_bytes": self.used,
            "prefix_budget": self.budget,
            "prefix_hits": self.hits,
            "prefix_tokens_reused": self.tokens_reused,
            "prefix_conversations": self.conversations,
        }
