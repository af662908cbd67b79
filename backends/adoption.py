"""Taking back a context a dead worker left in the disk tier, for the request it belongs to.

A worker starts by taking stock of the snapshot files in its state directory (``contexts``
keeps them as orphans) and names them in its ``ready``; the daemon sends each queued request
that owns one to it.  The file is trusted only for exactly the request it was computed from:
a digest of the model and of the prompt and generated ids is in its metadata.
"""

from __future__ import annotations

import logging
import time

from backends.kv_engine import KvEngine, Restored
from backends.sequence import Sequence
from contexts import disk
from ipc import messages as M

log = logging.getLogger("quantad.worker")


def ident(engine: KvEngine, seq: Sequence) -> str:
    """What ``seq``'s context is computed from: this model, and its prompt and generated ids."""
    return disk.ids_digest(seq.context_ids, f"{engine.model_name}|{engine.device}")


def adopt(engine: KvEngine, run: M.Run) -> tuple[Sequence, Restored | None]:
    """A request whose context a dead worker left on disk: rebuilt from the record, its KV read back.

    The file is used only when it was computed from exactly this request's prompt and
    streamed tokens (and passes ``disk.read``'s checks); otherwise (``None``) the request recomputes.
    """
    t0 = time.perf_counter()
    want = engine.contexts.orphans[run.rid]
    snap = engine.contexts.restore(run.rid)
    seq = engine.build(run)
    fits = want == ident(engine, seq) and snap.tokens == len(seq.context_ids)
    kv = None
    if snap.layers is None or snap.logits is None or not fits:
        log.info("request %s: the context file left on disk does not match it: recomputing", run.rid)
    else:
        kv = Restored(snap.layers, snap.logits)
        log.info("request %s: adopted its context file (%d tokens)", run.rid, snap.tokens)
    seq.switched(time.perf_counter() - t0, restored=True)
    return seq, kv
