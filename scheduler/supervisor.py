"""Liveness: notice dead or silent workers, re-queue what they held, restart them or give up.

A worker that dies during start-up is fatal (a bad model, device or memory: restarts will
not help).  Later, a dead or silent worker loses its requests to the run queue, where they
restart from the daemon's checkpoint (every streamed token is kept), and it is restarted
with a growing backoff, up to ``--max-restarts`` times.  When every worker is given up on,
the daemon stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from scheduler.workers import Worker

if TYPE_CHECKING:
    from scheduler.daemon import Daemon

log = logging.getLogger("quantad")


class Supervisor:
    def __init__(self, daemon: Daemon):
        self.d = daemon

    async def run(self) -> None:
        d = self.d
        while True:
            await asyncio.sleep(d.cfg.spec.heartbeat_s / 2)
            if d.stopping.is_set():
                return  # draining: workers are about to stop; the grace deadline answers what they held
            now = time.monotonic()
            for w in list(d.sched.workers.values()):
                if not await self._check(w, now):
                    return
            if all(w.dead for w in d.sched.workers.values()):
                self._fatal("every worker died more often than --max-restarts allows; see the worker log above")
                return

    async def _check(self, w: Worker, now: float) -> bool:
        """Handle one worker's death or silence; False when it is fatal."""
        proc, d = w.proc, self.d
        if w.dead:
            return True
        if proc is None:  # a remote worker: silence is all we see; it comes back with a new ``ready``
            if w.alive and w.silent_for(now) > d.cfg.liveness_s:
                log.warning("event=worker_lost worker=%s remote=true silent=true", w.name)
                self.lose(w)
            return True
        exited = proc.returncode is not None
        silent = w.alive and w.silent_for(now) > d.cfg.liveness_s
        if not (exited or silent):
            return True
        log.warning("event=worker_lost worker=%s exit=%s silent=%s", w.name, proc.returncode, silent)
        if not d.ready.is_set():  # start-up failed (bad model, device, memory): restarts will not help
            self._fatal(f"worker {w.name} exited with status {proc.returncode} during start-up")
            return False
        if not exited:
            await proc.kill()  # a wedged worker must not hold its routing id
        self.lose(w)
        if d.stopping.is_set() or proc.restarts >= d.cfg.max_restarts:
            w.dead = True
        else:
            await proc.restart()
        return True

    def lose(self, w: Worker) -> None:
        """Everything the worker held is gone: contexts it was exporting, and the requests it ran or kept."""
        d = self.d
        for req in d.sched.exporting_from(w.name):  # its context died with the exporter
            d.worker_ops.restart_on(req)
        for req in d.sched.worker_lost(w.name):
            log.info("event=requeue pid=%s tokens=%s", req.pid, len(req.tokens))
        d.schedule()

    def _fatal(self, reason: str) -> None:
        self.d.fatal = reason
        log.error("event=fatal reason=%r", reason)
        self.d.stopping.set()
