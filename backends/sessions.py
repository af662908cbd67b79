"""Sessions: a finished request's context kept under its agent's session, for the next turn to reuse.

Agents call the model in loops, and turn N+1 repeats turn N's whole conversation.  So a finished
row's KV stays in the context manager (within the tier budgets, LRU) under a key derived from the
session id, and a new request of that session starts from it, cropped to the longest prefix its
tokens share with the kept ones: only the rest is prefilled.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from backends.prefixes import common_prefix
from backends.sequence import Sequence
from contexts.snapshot import Snapshot
from ipc import messages as M

if TYPE_CHECKING:
    from backends.kv_engine import KvEngine


def session_key(session: str) -> int:
    """Sessions live in the context manager beside requests, under negative keys."""
    return -1 - int.from_bytes(hashlib.blake2b(session.encode(), digest_size=7).digest(), "big")


class Sessions:
    def __init__(self, engine: KvEngine):
        self.engine = engine

    def reuse(self, seq: Sequence) -> None:
        """Start from the session's kept KV, cropped to the prefix this prompt shares with it."""
        contexts, key = self.engine.contexts, session_key(seq.session)
        if key not in contexts:
            return
        snap = contexts.restore(key)
        kept: list[int] = snap.meta
        ids = seq.context_ids
        common = max(min(common_prefix(kept, ids), len(ids) - 1), 0)  # at least one token is fed, for fresh logits
        if snap.layers is None or common == 0:
            if snap.resident:  # llama.cpp's cells are not garbage collected
                snap.layers.free()
            return
        seq.head_start(self.engine.crop(snap.layers, common), common)

    def keep(self, seq: Sequence, state: Any) -> bool:
        """Keep a finished request's KV under its session, within the tier budgets (LRU)."""
        if not seq.session or not state:
            return False
        engine, key = self.engine, session_key(seq.session)
        engine.contexts.discard(key)
        covered = seq.context_ids[: engine.kv_length(state)]  # the last token chosen was never fed
        for m in engine.contexts.snapshot(key, Snapshot(layers=state, logits=None, meta=covered)):
            if m.key > 0:
                engine.send(M.Context(rid=m.key, tier=m.tier, bytes=m.nbytes))
        return True
