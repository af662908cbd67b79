"""The scheduler daemon: two ROUTER sockets, one asyncio loop, one receive loop per socket.

Agents talk to the agent socket; workers (child processes started by command line)
talk to the worker socket.  Each receive loop decodes a message into its typed record
(``ipc.messages``) and dispatches on the record's type: agent ops to ``agent_ops``, worker
news to ``worker_ops``.  Bad input from an agent gets an ``error`` reply and the loop goes
on.  What is left here is the sockets, the life cycle (start, systemd, stop) and the
dispatch in both directions; the decisions are the scheduler's (``core``), the request's
state changes go through it, liveness is the ``supervisor``'s, the drain is ``drain``'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
import sys

import zmq
import zmq.asyncio

from ipc import messages as M
from ipc import protocol as P
from ipc.logfmt import under_journald
from scheduler import model_card, reload, sd_notify
from scheduler.agent_ops import AgentOps, Caller
from scheduler.core import Scheduler
from scheduler.daemon_config import DaemonConfig
from scheduler.drain import Drain
from scheduler.fronts import Fronts
from scheduler.gate import AGENTS, WORKERS, Gate, uses_curve
from scheduler.journal import Journal, NullJournal
from scheduler.lifecycle import Lifecycle
from scheduler.limits import Admission
from scheduler.outbox import Outbox
from scheduler.phase import Phase
from scheduler.prompt_size import PromptSizer
from scheduler.response_store import ResponseStore
from scheduler.stats import Views
from scheduler.supervisor import Supervisor
from scheduler.worker_ops import WorkerOps
from scheduler.workers import Worker, WorkerProcess

log = logging.getLogger("quantad")

STATUS_PERIOD_S = 1.0
# Messages queued per agent connection before ZeroMQ stops reading it.  At 100,000, 100,000 bad
# frames (some of 100 kB) from 8 connections took the daemon from 89 to 757 MiB (benchmarks/soak.py).
AGENT_RCVHWM = 1000


class Daemon:
    """The sockets, the loops and the wiring: each collaborator gets the few others it uses."""

    def __init__(self, cfg: DaemonConfig):
        self.cfg = cfg
        self.sched = Scheduler(cfg.policy)
        self.ctx = zmq.asyncio.Context()
        self.gate = Gate(self.ctx, "ipc" if cfg.endpoint.startswith("ipc://") else "tcp", cfg.keys)
        self.agents = self._socket(P.MAX_FRAME, AGENTS, curve=uses_curve(cfg.endpoint, cfg.keys))
        self.workers_sock = self._socket(P.MAX_TENSOR_FRAME, WORKERS, curve=uses_curve(cfg.worker_endpoint, cfg.keys))
        self.workers_sock.setsockopt(zmq.ROUTER_HANDOVER, 0)  # a second connection claiming a live worker is refused
        self.agents.setsockopt(zmq.SNDHWM, cfg.limits.max_unread)  # past it: EAGAIN, and its requests are cancelled
        self.agents.setsockopt(zmq.RCVHWM, AGENT_RCVHWM)  # a flood waits in its sender, not in our memory
        self.gate.max_connections = cfg.limits.max_connections
        for opt in (zmq.SNDBUF, zmq.RCVBUF):  # migrations relay whole contexts through it
            self.workers_sock.setsockopt(opt, P.BULK_SOCKET_BUFFER)
        self.phase = Phase()
        # exact prompt lengths once a worker names its tokenizer; the context length from the model's files till then
        self.sizer = PromptSizer(model_card.expected_context(cfg.spec))
        self.outbox = Outbox(self.agents, self.workers_sock)
        journal = NullJournal() if cfg.journal is None else Journal(cfg.journal, cfg.journal_keep_s)
        db = journal.db if isinstance(journal, Journal) else None  # --no-journal: kept in memory
        responses = ResponseStore(db, cfg.responses_keep_s, cfg.max_stored_responses)
        self.life = Lifecycle(self.sched, self.outbox, journal, Admission(cfg.limits), self.settle, responses)
        self.outbox.on_agent_gone = self.life.agent_gone
        urls: dict[str, str | None] = {"http": None, "metrics": None}  # filled in as the fronts listen
        self.views = Views(self.sched, self.life, cfg, self.sizer, self.gate, urls, self.phase)
        self.fronts = Fronts(cfg, self.views, self.life.finish_hooks)
        self.drain = Drain(self.life, cfg, self.phase, self.views)
        self.worker_ops = WorkerOps(self.life, self.outbox, self.sizer, self.phase, self.announce_ready)
        self.supervisor = Supervisor(self.sched, cfg, self.phase, self.worker_ops)
        agent_ops = AgentOps(self.life, self.outbox, self.sizer, self.phase, self.views, self.background)
        self.on_agent = agent_ops.handlers()
        self.on_worker = self.worker_ops.handlers()
        self._tasks: set[asyncio.Task] = set()

    def _socket(self, max_size: int, domain: bytes, curve: bool) -> zmq.asyncio.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a peer reconnecting with its fixed id takes its place
        s.zap_domain = domain  # every connection goes past the gate (``scheduler.gate``)
        if curve:
            s.curve_server, s.curve_secretkey = True, self.cfg.keys.secret
        elif domain == WORKERS:
            s.plain_server = True  # the daemon's workers log in with their name and the secret it gave them
        s.setsockopt(zmq.MAXMSGSIZE, max_size)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        return s

    # ---- life cycle ---------------------------------------------------------------------
    async def run(self) -> int:
        self.gate.start()  # before the binds: no connection gets past without it
        old = os.umask(0o007)  # sockets are created with this mode; no chmod race
        try:
            self.agents.bind(self.cfg.endpoint)
            self.workers_sock.bind(self.cfg.worker_endpoint)
        finally:
            os.umask(old)
        try:
            await self.fronts.start()
        except OSError as exc:  # port taken, address not here: fail before any worker starts
            log.error("event=fatal reason=%r", f"cannot listen: {exc}")
            await self.fronts.stop()
            self._close()
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.drain.on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, reload.reload, self.cfg, self.views, self.worker_ops)
        self.life.recover()
        self._start_workers()
        loops = [self._agent_loop(), self._worker_loop(), self.supervisor.run(), self._status_loop()]
        loops.append(self.gate.count(self.agents))  # open agent connections, for --max-connections
        period = sd_notify.watchdog_period()
        if period is not None:
            loops.append(self._watchdog(period))
        tasks = [asyncio.create_task(c) for c in loops]
        log.info("event=listening endpoint=%s workers=%s", self.cfg.endpoint, self.cfg.workers)
        sd_notify.notify(self.views.status_line())
        await self.phase.stopping.wait()
        rc = await self.drain.run()
        await self.fronts.stop()  # after the drain: HTTP streams have had their terminal events
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._close()
        return rc

    def _close(self) -> None:
        self.life.journal.close()
        self.gate.stop()
        self.agents.close(0)
        self.workers_sock.close(0)
        self.ctx.term()

    def _start_workers(self) -> None:
        env = {"QUANTAD_LOG_FORMAT": self.cfg.log_format, **self.cfg.spec.env()}
        for i in range(self.cfg.workers):
            name = f"w{i}"
            curve = uses_curve(self.cfg.worker_endpoint, self.cfg.keys)
            creds = functools.partial(self.gate.mint, name, curve)
            argv = dataclasses.replace(self.cfg.spec.named(name), credentials="stdin").argv()
            proc = WorkerProcess(name, argv, env, credentials=creds)
            self.sched.workers[name] = Worker(name, self.cfg.spec.slots, proc=proc)
            proc.start()

    def announce_ready(self) -> None:
        """Every worker is up for the first time: serving."""
        self.phase.ready.set()
        spec = self.cfg.spec
        log.info("event=ready endpoint=%s backend=%s model=%s", self.cfg.endpoint, spec.backend, spec.model)
        sd_notify.notify("READY=1", self.views.status_line())
        if not under_journald():  # for a person (and scripts) watching a terminal
            engine = f"{spec.backend} engine, {spec.slots} slot(s), model {spec.model}"
            print(f"quantad: ready on {self.cfg.endpoint} ({engine})", file=sys.stderr, flush=True)

    async def _status_loop(self) -> None:
        last = None
        while True:
            self.life.counters.sample()
            self.life.admission.prune()
            self.life.journal.expire()
            self.life.responses.expire()
            status = self.views.status_line()
            if status != last:
                sd_notify.notify(status)
                last = status
            await asyncio.sleep(STATUS_PERIOD_S)

    async def _watchdog(self, period: float) -> None:
        """Pings from the scheduler's own loop: if the loop wedges, the pings stop and systemd acts."""
        log.info("event=watchdog period_s=%.3f", period)
        while True:
            sd_notify.notify("WATCHDOG=1")
            await asyncio.sleep(period)

    def background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- agent side ---------------------------------------------------------------------
    async def _agent_loop(self) -> None:
        while True:
            raw = await self.agents.recv_multipart(copy=False)
            await asyncio.sleep(0)  # a ready recv does not yield: let the other socket's loop run
            frames = [f.bytes for f in raw]
            try:
                self._from_agent(frames, raw[-1].get("User-Id"))
            except Exception:  # a bug must not stop the loop; the agent still gets an answer
                log.exception("event=internal_error side=agent")
                if len(frames) >= 2:
                    self.outbox.error(frames[0], None, P.E_INTERNAL, "internal error")

    def _from_agent(self, frames: list[bytes], identity: str) -> None:
        addr, cid = frames[0], None
        try:
            cid, rec = M.read_agent(frames[1:])
            self.life.admission.message(addr)
            self.on_agent[type(rec)](Caller(addr, identity, self.gate.is_admin(identity)), cid, rec)
        except P.ProtocolError as exc:
            cid = exc.cid if isinstance(exc, M.AgentError) else cid
            log.info("event=bad_input id=%.80r code=%s message=%.200r", cid, exc.code, exc.message)
            self.outbox.error(addr, cid, exc.code, exc.message)

    # ---- worker side --------------------------------------------------------------------
    def settle(self) -> None:
        """After any change: place what can run; draining, answer the queue first (``flush_queue`` then
        ends the drain when nothing is left), so only what was running when it began is placed again."""
        if self.phase.stopping.is_set():
            self.drain.flush_queue()
        for req in self.sched.schedule():
            self.worker_ops.start(req)

    async def _worker_loop(self) -> None:
        while True:
            frames = await self.workers_sock.recv_multipart(copy=False)
            await asyncio.sleep(0)  # a flood of worker tokens must not starve the agents
            try:
                self._from_worker(frames)
            except P.ProtocolError as exc:
                log.error("event=bad_worker_message code=%s message=%.200r", exc.code, exc.message)
            except Exception:
                log.exception("event=internal_error side=worker")

    def _from_worker(self, frames: list) -> None:
        name = frames[0].bytes.decode("utf-8", "replace")
        if len(frames) < 2 or frames[1].get("User-Id") != f"worker:{name}":  # the gate let it in as another
            raise P.ProtocolError(P.E_BAD_FRAME, f"message from unknown worker {name!r}")
        rec, extra = M.read(frames[1:], M.FROM_WORKER)
        w = self.sched.workers.get(name) or self.worker_ops.remote(name, rec)
        w.seen()
        self.on_worker[type(rec)](w, rec, extra)


def serve(cfg: DaemonConfig) -> int:
    return asyncio.run(Daemon(cfg).run())
