"""Migration for local engines: a saved context leaves as raw tensor frames and continues elsewhere.

Out: the frames go to the daemon beside ``exported`` (it relays them untouched), or straight to
the importer's inbox (``backends.peer``) when the daemon names one.  In: the request is rebuilt
from the daemon's ``run`` (prompt, replayed tokens, detokenizer), then its KV and logits come
from the frames, so nothing is recomputed; frames that never arrive or do not fit the request's
tokens mean a recompute from the tokens, never wrong output.  Frame order: layer 0 keys, layer 0
values, layer 1 keys, ..., then the last logits (docs/protocol.md 6.4).
"""

from __future__ import annotations

import logging
import time

from backends.kv_engine import KvEngine, Restored
from backends.peer import PeerLink, inbox_endpoint
from backends.sequence import Sequence
from contexts.wire import from_frames, to_frames
from ipc import messages as M
from ipc import protocol as P

log = logging.getLogger("quantad.worker")
PEER_WAIT_S = 10.0  # how long a migrated request's ``run`` waits for its context's frames (then: recompute)


class Migration:
    def __init__(self, engine: KvEngine):
        self.engine = engine
        spec = engine.spec
        inbox = inbox_endpoint(spec.endpoint, spec.name) if spec.peer_endpoint == "auto" else spec.peer_endpoint
        self.peers = PeerLink(engine.ctx, inbox or None)

    def export(self, exp: M.Export) -> None:
        """Hand a preempted context over, for another worker: raw tensor frames."""
        engine, rid = self.engine, exp.rid
        if rid not in engine.contexts or rid in engine.contexts.orphans:  # an orphan is adopted only here
            engine.contexts.discard(rid)
            engine.send(M.Exported(rid=rid, lost=True))
            return
        t0 = time.perf_counter()
        snap = engine.contexts.restore(rid)
        seq: Sequence = snap.meta
        layers = snap.layers.evict() if snap.resident else snap.layers  # out of llama.cpp's cache, as bytes
        tensors = [] if layers is None else [t for kv in layers for t in kv] + [snap.logits]
        specs, frames = to_frames(tensors)
        direct = bool(frames) and exp.peer is not None and self.peers.push(exp.peer, rid, specs, frames)
        if direct:
            frames = []  # the frames went straight to the importer's inbox
        seq.switched(time.perf_counter() - t0)
        carried = M.Carried(
            prefill_computed=seq.prefill_computed,
            decode_computed=seq.decode_computed,
            restores=seq.restores,
            reused=seq.reused,
            switch_s=seq.switch_s,
            layers=0 if layers is None else len(layers),
            direct=direct,
        )
        engine.send(M.Exported(rid=rid, migrate=carried.encode(), tensors=specs), frames)

    def bring_in(self, run: M.Run, frames: list) -> tuple[Sequence, Restored | None]:
        """Continue a context that another worker exported: no recomputation when its KV came along."""
        carried = M.Carried.of(run.migrate)
        seq = self.engine.build(run)  # renders the prompt, replays the detokenizer
        seq.carried_over(carried)
        kv = self._load(seq, carried, run.tensors, frames)
        seq.switched(0.0, restored=True)
        return seq, kv

    def _load(self, seq: Sequence, carried: M.Carried, specs: list, frames: list) -> Restored | None:
        """The context's KV and logits from the frames (relayed, or pushed to the inbox); None: rebuild it."""
        engine, rid, n = self.engine, seq.rid, carried.layers
        t0 = time.perf_counter()
        if n and carried.direct:
            pushed = self.peers.claim(rid, PEER_WAIT_S)
            if pushed is None:  # the exporter's push never came: rebuild from the tokens
                log.warning("context %s pushed by a peer never arrived: recomputing it", rid)
                n = 0
            else:
                specs, frames = pushed
        if n:
            tensors = from_frames(specs, frames, engine.device)
            layers = [(tensors[2 * i], tensors[2 * i + 1]) for i in range(n)] if len(tensors) == 2 * n + 1 else []
            if not layers or engine.kv_length(layers) != len(seq.context_ids):
                raise P.ProtocolError(P.E_BAD_FIELD, "migrated context does not match the request's tokens")
            seq.switched(time.perf_counter() - t0)
            return Restored(layers, tensors[-1])
        return None
