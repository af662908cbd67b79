"""What passes from one daemon to the next through the journal: requests handed over, and taken back.

A stopping daemon (``--on-stop handover``, or a drain cut short) leaves its live requests
unfinished in the journal and tells their followers so (``shutting_down``, ``resumable``);
the next daemon on the state directory, or one that starts after a crash, queues them again
before it accepts anything new, each from its last checkpoint, under its old pid.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ipc import messages as M
from ipc import protocol as P
from scheduler.request import Request, State

if TYPE_CHECKING:
    from scheduler.daemon import Daemon

log = logging.getLogger("quantad")


def recover(d: Daemon) -> None:
    """Requests a dead predecessor accepted and did not end: queued first, from their last checkpoint."""
    if d.journal is None:
        return
    back = d.journal.unfinished()
    for req in back:
        d.admission.admit(req.owner, req.cost, True)  # counted against its owner; never refused
        d.by_client[(req.agent_addr, req.client_id)] = req
        d.sched.add(req)
    if back:
        ms, tokens = 1e3 * d.journal.recovery_s, sum(r.generated for r in back)
        log.info("event=recovered requests=%s tokens=%s read_ms=%.1f", len(back), tokens, ms)


def hand_over(d: Daemon, req: Request, why: str) -> None:
    """Stopping: ``req`` stays unfinished in the journal for the next daemon; its followers are told so."""
    if req.worker is not None:
        d.to_worker(req.worker, M.Cancel(req.pid))
    d.retire(req, State.CANCELLED)
    d.journal.keep_unfinished([req])
    d.emit(req, P.EV_ERROR, code=P.E_SHUTTING_DOWN, message=why, text=req.text, resumable=True)
