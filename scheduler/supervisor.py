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

from scheduler.core import Scheduler
from scheduler.daemon_config import DaemonConfig
from scheduler.phase import Phase
from scheduler.worker_ops import WorkerOps
from scheduler.workers import Worker

log = logging.getLogger("quantad")


class Supervisor:
    def __init__(self, sched: Scheduler, cfg: DaemonConfig, phase: Phase, worker_ops: WorkerOps):
        self.sched, self.cfg, self.phase, self.worker_ops = sched, cfg, phase, worker_ops

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.spec.heartbeat_s / 2)
            if self.phase.stopping.is_set():
                return  # draining: workers are about to stop; the grace deadline answers what they held
            now = time.monotonic()
            for w in list(self.sched.workers.values()):
                if not await self._check(w, now):
                    return
            if all(w.dead for w in self.sched.workers.values()):
                self._fatal("every worker died more often than --max-restarts allows; see the worker log above")
                return

    async def _check(self, w: Worker, now: float) -> bool:
        """Handle one worker's death or silence; False when it is fatal."""
        proc, cfg = w.proc, self.cfg
        if w.dead:
            return True
        if proc is None:  # a remote worker: silence is all we see; it comes back with a new ``ready``
            if w.alive and w.silent_for(now) > cfg.liveness_s:
                log.warning("event=worker_lost worker=%s remote=true silent=true", w.name)
                self.worker_ops.lose(w)
            return True
        exited = proc.returncode is not None
        silent = w.alive and w.silent_for(now) > cfg.liveness_s
        if not (exited or silent):
            return True
        log.warning("event=worker_lost worker=%s exit=%s silent=%s", w.name, proc.returncode, silent)
        if not self.phase.ready.is_set():  # start-up failed (bad model, device, memory): restarts will not help
            self._fatal(f"worker {w.name} exited with status {proc.returncode} during start-up")
            return False
        if not exited:
            await proc.kill()  # a wedged worker must not hold its routing id
        self.worker_ops.lose(w)
        if self.phase.stopping.is_set() or proc.restarts >= cfg.max_restarts:
            w.dead = True
        else:
            await proc.restart()
        return True

    def _fatal(self, reason: str) -> None:
        log.error("event=fatal reason=%r", reason)
        self.phase.fail(reason)
