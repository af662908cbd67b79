"""Where a row's KV comes from when a request (re)starts on this worker, decided in one place.

In order: a context file a dead worker left for it (adopted when it matches), its own snapshot
(any tier; the recompute tier has none), a context another worker exported to it, or nothing:
then it prefills, from its session's kept KV or a shared prefix when the prefill line finds one.
Each source answers data (the row, and its KV or ``None``); the engine places the row.
"""

from __future__ import annotations

import time

from backends import adoption
from backends.kv_engine import KvEngine, Restored
from backends.migration import Migration
from backends.sequence import Sequence
from backends.sessions import Sessions
from ipc import messages as M


class KvSources:
    def __init__(self, engine: KvEngine, migration: Migration, sessions: Sessions):
        self.engine, self.migration, self.sessions = engine, migration, sessions
        self.adopted = 0  # requests resumed from a context file a dead worker left

    def find(self, run: M.Run, frames: list) -> tuple[Sequence, Restored | None]:
        contexts = self.engine.contexts
        if run.rid in contexts.orphans:
            seq, kv = adoption.adopt(self.engine, run)
            self.adopted += kv is not None
            return seq, kv
        if run.rid in contexts:
            return self._resume(run.rid)
        if run.migrate is not None:
            return self.migration.bring_in(run, frames)
        seq = self.engine.build(run)
        if seq.session and not run.resume_ids:
            self.sessions.reuse(seq)  # a head start for the prefill: the session's KV, cropped
        return seq, None

    def _resume(self, rid: int) -> tuple[Sequence, Restored | None]:
        """Its own snapshot, from whichever tier holds it."""
        t0 = time.perf_counter()
        snap = self.engine.contexts.restore(rid)
        seq: Sequence = snap.meta
        kv = None
        if snap.layers is None:  # recompute tier: feed prompt + generated again
            seq.from_scratch()
        else:
            kv = Restored(snap.layers, snap.logits)
        seq.switched(time.perf_counter() - t0, restored=True)
        return seq, kv
