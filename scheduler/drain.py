"""Shutdown: the first SIGTERM/SIGINT drains, a second one cuts the drain short.

Draining refuses new chats and answers the queue at once; running requests go on, no
longer preempted, until they end or the grace period (less a reserve for stopping the
workers) runs out.  Whatever is left then gets an ``error`` (code ``shutting_down``) with
its partial text, the workers are told to stop, and the ones that do not are killed
within the grace period.  With the journal on, what is cut stays in it unfinished
(``resumable: true`` in that error): the next daemon on the state directory finishes it.
``--on-stop handover`` does that to every live request at once, queued ones too, and
stops without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from ipc import messages as M
from ipc import protocol as P
from scheduler import sd_notify
from scheduler.daemon_config import DaemonConfig
from scheduler.lifecycle import Lifecycle
from scheduler.phase import Phase
from scheduler.request import State
from scheduler.stats import Views

log = logging.getLogger("quantad")

SHUTTING_DOWN = "the daemon is shutting down; 'text' holds the partial answer"
HANDED_OVER = "the daemon is stopping; the request stays in its journal and the next daemon finishes it (attach)"


class Drain:
    def __init__(self, life: Lifecycle, cfg: DaemonConfig, phase: Phase, views: Views):
        self.life, self.sched, self.cfg, self.phase, self.views = life, life.sched, cfg, phase, views
        self._flushing = False
        # Running when the drain began: one whose quantum end had already asked it to yield is
        # preempted after that and lands in the queue, but it was running, so it runs on.
        self._running: set[int] = set()

    def on_signal(self, sig: signal.Signals) -> None:
        """The first SIGTERM/SIGINT drains; a second one cuts the drain short."""
        if self.phase.stopping.is_set():
            log.info("event=drain_cut signal=%s", sig.name)
            self.phase.drained.set()
            return
        log.info("event=signal signal=%s", sig.name)
        self._running = {r.pid for r in self.sched.live() if r.state is State.RUNNING}
        self.phase.stopping.set()

    async def run(self) -> int:
        """Drain, then stop the workers; the daemon's exit status (1 after a fatal error)."""
        life, t0 = self.life, time.monotonic()
        grace, durable = self.cfg.grace_s, life.journal.durable
        sd_notify.notify("STOPPING=1", self.views.status_line("stopping"))
        live = self.sched.live()
        running = sum(r.state is State.RUNNING for r in live)
        log.info("event=draining grace_s=%s running=%s queued=%s", grace, running, len(self.sched.ready))
        leaving = self.cfg.on_stop == "handover" and durable
        if leaving:
            self._hand_over_all()
        self.flush_queue()
        if self.phase.fatal is None and not leaving:
            self.check()
            reserve = min(2.0, grace / 4)
            try:
                await asyncio.wait_for(self.phase.drained.wait(), max(0.0, grace - reserve - (time.monotonic() - t0)))
            except TimeoutError:
                pass
        for req in self.sched.live():
            log.info("event=drain_cut_request pid=%s tokens=%s", req.pid, req.generated)
            if durable:
                life.hand_over(req, HANDED_OVER)
            else:
                life.fail(req, P.E_SHUTTING_DOWN, SHUTTING_DOWN)
        workers = list(self.sched.workers.values())
        for w in workers:
            life.outbox.to_worker(w.name, M.Shutdown())
        left = max(0.05, grace - 0.1 - (time.monotonic() - t0))  # then SIGKILL: exit within the grace period
        await asyncio.gather(*(w.proc.stop(left) for w in workers if w.proc is not None))
        rc = 0 if self.phase.fatal is None else 1
        log.info("event=stopped after_s=%.3f rc=%s", time.monotonic() - t0, rc)
        return rc

    def _hand_over_all(self) -> None:
        for req in sorted(self.sched.live(), key=lambda r: r.pid):
            log.info("event=handover pid=%s tokens=%s", req.pid, req.generated)
            self.life.hand_over(req, HANDED_OVER)

    def flush_queue(self) -> None:
        """While draining, nothing new starts: every queued request gets its terminal reply now (but those
        that were running when the drain began: they are placed again)."""
        if self._flushing:
            return
        self._flushing = True
        try:
            for req in list(self.sched.ready):
                if not req.finished and req.pid not in self._running:
                    log.info("event=drain_queued pid=%s tokens=%s", req.pid, req.generated)
                    self.life.fail(req, P.E_SHUTTING_DOWN, SHUTTING_DOWN)
        finally:
            self._flushing = False
        self.check()

    def check(self) -> None:
        """Draining and no request left: the drain is over."""
        if self.phase.stopping.is_set() and not self.sched.live():
            self.phase.drained.set()
