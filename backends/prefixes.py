"""Shared prompt prefixes: prompts recently prefilled, kept so that a new prompt starting the same way
prefills only the rest.

Requests to one model mostly start alike (the chat template's system turn, an agent's
instructions), and a burst of them pays for the same prefix again and again.  Each prompt a
worker prefills is kept here as the host form of its state (``keep_copy``: on llama.cpp the
sequence's state bytes), with its last logits, LRU within a byte budget.  A new prompt starts
from the entry it shares the longest prefix with: the state copied into a new sequence and cut
to that prefix (``fork``, ``crop``), or, when the whole prompt matches, joins the batch at once
with the entry's logits (nothing computed, the same bits as the first).  llama-server reuses a
slot's previous prompt the same way; vLLM shares blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIN_SHARED = 16  # a shorter common prefix is not worth a state copy


def common_prefix(a, b) -> int:
    """How many leading tokens two id sequences share."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


@dataclass
class Prefix:
    ids: np.ndarray
    state: Any  # the host form of the prompt's state (holds nothing of the engine's)
    logits: Any  # the prompt's last logits [1, vocab]
    nbytes: int


@dataclass
class PrefixCache:
    budget: int  # bytes of kept states
    entries: OrderedDict[tuple[int, ...], Prefix] = field(default_factory=OrderedDict)
    used: int = 0
    hits: int = 0
    tokens_reused: int = 0

    def __bool__(self) -> bool:
        return self.budget > 0

    def longest(self, ids: list[int]) -> tuple[int, Prefix | None]:
        """The entry sharing the longest prefix with ``ids``, and how many tokens it shares."""
        want = np.asarray(ids, dtype=np.int64)
        best, best_n = None, 0
        for key, entry in self.entries.items():
            common = common_prefix(entry.ids, want)
            if common > best_n:
                best, best_n = key, common
        if best is None or best_n < MIN_SHARED:
            return 0, None
        self.entries.move_to_end(best)
        self.hits += 1
        return best_n, self.entries[best]

    def offer(self, ids: list[int], state: Any, logits: Any) -> None:
        """Keep a prefilled prompt's state (a copy the caller made), evicting the least recently used."""
        nbytes = sum(t.numel() * t.element_size() for pair in state for t in pair)
        key = tuple(ids)
        if nbytes > self.budget or len(ids) < MIN_SHARED:
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.used -= old.nbytes
        while self.entries and self.used + nbytes > self.budget:
            self.used -= self.entries.popitem(last=False)[1].nbytes
        self.entries[key] = Prefix(np.asarray(ids, dtype=np.int64), state, logits, nbytes)
        self.used += nbytes

    def stats(self) -> dict[str, int]:
        return {
            "prefix_entries": len(self.entries),
            "prefix_bytes": self.used,
            "prefix_hits": self.hits,
            "prefix_tokens_reused": self.tokens_reused,
        }
