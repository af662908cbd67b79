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

import argparse
import asyncio
import dataclasses
import functools
import itertools
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from ipc import messages as M
from ipc import protocol as P
from ipc.logfmt import under_journald
from ipc.worker_spec import WorkerSpec
from scheduler import fronts, handover, reload, sd_notify, tool_events
from scheduler.agent_ops import AgentOps, Caller
from scheduler.config import Effective
from scheduler.core import Scheduler
from scheduler.counters import Counters
from scheduler.drain import Drain
from scheduler.gate import AGENTS, WORKERS, Gate, Keys, uses_curve
from scheduler.journal import Journal
from scheduler.limits import Admission, Limits
from scheduler.policy import Policy
from scheduler.prompt_size import PromptSizer
from scheduler.request import Request, State
from scheduler.stats import status_line
from scheduler.supervisor import Supervisor
from scheduler.worker_ops import WorkerOps
from scheduler.workers import Worker, WorkerProcess

log = logging.getLogger("quantad")

STATUS_PERIOD_S = 1.0
# Messages queued per agent connection before ZeroMQ stops reading it.  At 100,000, 100,000 bad
# frames (some of 100 kB) from 8 connections took the daemon from 89 to 757 MiB (benchmarks/soak.py).
AGENT_RCVHWM = 1000


@dataclass
class DaemonConfig:
    endpoint: str
    worker_endpoint: str
    policy: Policy
    spec: WorkerSpec  # every worker's options (its command line); endpoint and name are filled in per worker
    workers: int = 1
    liveness_s: float = 30.0
    max_restarts: int = 5
    grace_s: float = 30.0  # SIGTERM: how long running requests may go on before they are cut
    log_format: str = "kv"  # passed on to the workers
    options: Effective | None = None  # the resolved serve options (for SIGHUP's diff)
    reload_options: Callable[[], Effective] | None = None  # re-reads the config file on SIGHUP
    build_policy: Callable[[argparse.Namespace], Policy] | None = None
    model_name: str = ""  # what /v1/models calls the model (a directory's name, or the remote name)
    model_aliases: tuple[str, ...] = ()  # other names an HTTP request may give (--model as given, the path)
    http: tuple[str, int] | None = None  # OpenAI-compatible HTTP front (host, port); None: off
    http_token: dict[str, str] | None = None  # bearer tokens the HTTP front accepts -> whose (``http:NAME``)
    metrics_port: int | None = None  # Prometheus /metrics on 127.0.0.1; None: off
    keys: Keys | None = None  # CURVE: the daemon's key pair and the allowed keys (``--curve-dir``)
    limits: Limits = field(default_factory=Limits)  # quotas per identity, rates per connection
    journal: Path | None = None  # the SQLite journal of accepted requests (``scheduler.journal``); None: off
    journal_keep_s: float = 300.0  # how long an ended request stays there, for ``attach``
    on_stop: str = "drain"  # SIGTERM: drain (finish within grace), or handover (leave all to the next daemon)


class Daemon:
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
        self.admission = Admission(cfg.limits)
        self.gate.max_connections = cfg.limits.max_connections
        self.sizer = PromptSizer()  # exact prompt lengths, once a worker names its tokenizer
        for opt in (zmq.SNDBUF, zmq.RCVBUF):  # migrations relay whole contexts through it
            self.workers_sock.setsockopt(opt, P.BULK_SOCKET_BUFFER)
        # Synchronous shadows: sends are non-blocking and fail here, where we can handle them.
        self._agents_tx = zmq.Socket.shadow(self.agents.underlying)
        self._workers_tx = zmq.Socket.shadow(self.workers_sock.underlying)
        self.by_client: dict[tuple[bytes, Any], Request] = {}
        self.journal = None if cfg.journal is None else Journal(cfg.journal, cfg.journal_keep_s)
        self.pids = itertools.count(1 + (self.journal.max_pid() if self.journal else 0))
        self.seq = itertools.count(1)
        self.stopping = asyncio.Event()
        self.drained = asyncio.Event()  # draining: no request left, or a second signal
        self.ready = asyncio.Event()
        self.fatal: str | None = None
        self._tasks: set[asyncio.Task] = set()
        self.counters = Counters()
        self.finish_hooks: list[Callable[[Request], None]] = []  # called once per request, at its end
        self.urls: dict[str, str | None] = {"http": None, "metrics": None}
        self.listeners: list[Any] = []  # the HTTP front and the metrics server, when on
        self.drain = Drain(self)
        self.supervisor = Supervisor(self)
        self.agent_ops = AgentOps(self)
        self.worker_ops = WorkerOps(self)
        self.on_agent = self.agent_ops.handlers()
        self.on_worker = self.worker_ops.handlers()

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
            await fronts.start(self)
        except OSError as exc:  # port taken, address not here: fail before any worker starts
            log.error("event=fatal reason=%r", f"cannot listen: {exc}")
            await fronts.stop(self)
            self._close()
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.drain.on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, reload.reload, self)
        handover.recover(self)
        self._start_workers()
        loops = [self._agent_loop(), self._worker_loop(), self.supervisor.run(), self._status_loop()]
        loops.append(self.gate.count(self.agents))  # open agent connections, for --max-connections
        period = sd_notify.watchdog_period()
        if period is not None:
            loops.append(self._watchdog(period))
        tasks = [asyncio.create_task(c) for c in loops]
        log.info("event=listening endpoint=%s workers=%s", self.cfg.endpoint, self.cfg.workers)
        sd_notify.notify(status_line(self))
        await self.stopping.wait()
        rc = await self.drain.run()
        await fronts.stop(self)  # after the drain: HTTP streams have had their terminal events
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._close()
        return rc

    def _close(self) -> None:
        if self.journal is not None:
            self.journal.close()
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
        self.ready.set()
        spec = self.cfg.spec
        log.info("event=ready endpoint=%s backend=%s model=%s", self.cfg.endpoint, spec.backend, spec.model)
        sd_notify.notify("READY=1", status_line(self))
        if not under_journald():  # for a person (and scripts) watching a terminal
            engine = f"{spec.backend} engine, {spec.slots} slot(s), model {spec.model}"
            print(f"quantad: ready on {self.cfg.endpoint} ({engine})", file=sys.stderr, flush=True)

    async def _status_loop(self) -> None:
        last = None
        while True:
            self.counters.sample()
            self.admission.prune()
            if self.journal is not None:
                self.journal.expire()
            status = status_line(self)
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
                    error = {"event": P.EV_ERROR, "id": None, "code": P.E_INTERNAL, "message": "internal error"}
                    self.send_agent(frames[0], error)

    def _from_agent(self, frames: list[bytes], identity: str) -> None:
        addr, cid = frames[0], None
        try:
            cid, rec = M.read_agent(frames[1:])
            self.admission.message(addr)
            self.on_agent[type(rec)](Caller(addr, identity, self.gate.is_admin(identity)), cid, rec)
        except P.ProtocolError as exc:
            cid = exc.cid if isinstance(exc, M.AgentError) else cid
            log.info("event=bad_input id=%.80r code=%s message=%.200r", cid, exc.code, exc.message)
            self.send_agent(addr, {"event": P.EV_ERROR, "id": cid, "code": exc.code, "message": exc.message})

    def reply(self, addr: bytes, cid: Any, data: dict) -> None:
        self.send_agent(addr, {"event": P.EV_REPLY, "id": cid, "data": data})

    def send_agent(self, addr: bytes, msg: dict) -> bool:
        msg["seq"] = next(self.seq)
        try:
            self._agents_tx.send_multipart([addr, P.pack(msg)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: agent gone; EAGAIN: agent not reading
            log.info("event=agent_gone errno=%s", exc.errno)
            # its requests lose a follower; those it leaves with none are cancelled (nobody would read them)
            gone = [r for r in self.sched.table.values() if not r.finished and r.unwatch(addr)]
            for req in gone:  # one pass, one schedule: thousands of them must not hold the loop
                self.cancel(req, "agent disconnected", notify=False, reschedule=False)
            if gone:
                self.schedule()
            return False
        finally:
            self.agents.get(zmq.EVENTS)  # re-arm the pending receive: see to_worker

    def emit(self, req: Request, event: str, **fields: Any) -> None:
        """An event of ``req`` to everyone following it; a token event carries what each has not had yet."""
        for (addr, cid), w in list(req.watchers.items()):
            if not w.stream and event in (P.EV_TOKEN, P.EV_PREEMPTED, P.EV_RESUMED):
                continue
            msg, calls = {"event": event, "id": cid, "pid": req.pid, **fields}, []
            if event == P.EV_TOKEN:
                start, had, out = w.tokens, w.chars, req.unsent(w)
                if out is None:  # recomputed after a restart: it has these already
                    continue
                msg["text"], msg["token_ids"] = out
                msg["index"], msg["chars"] = req.generated, len(req.text)
                if tool_events.splits(req):  # no call markup in a token's text: the calls follow as deltas
                    msg["text"], calls = tool_events.view(req, had)
                if req.params.get("logprobs"):
                    msg["logprobs"] = req.logprobs[start : req.generated]
            self.send_agent(addr, msg)
            for call in calls:
                self.send_agent(addr, {"id": cid, "pid": req.pid, **call})

    # ---- a request's end ----------------------------------------------------------------
    def terminal(self, req: Request, state: State, event: str, **fields: Any) -> None:
        """The one terminal reply of a request: leave the tables, then tell the agent."""
        policy_view = self.retire(req, state)
        fields["stats"] = req.stats() | policy_view | fields.get("stats", {})
        self.emit(req, event, **fields)
        if self.journal is not None:
            self.journal.end(req, {"event": event, "pid": req.pid, **fields})
        self.schedule()
        self.drain.check()

    def cancel(self, req: Request, why: str, notify: bool = True, reschedule: bool = True) -> None:
        if req.finished:
            return
        if req.worker is not None:
            self.to_worker(req.worker, M.Cancel(req.pid))
        log.info("event=cancelled pid=%s why=%r", req.pid, why)
        if notify:
            self.terminal(req, State.CANCELLED, P.EV_CANCELLED, message=why, text=req.text)
        else:
            self.retire(req, State.CANCELLED)
            if self.journal is not None:
                self.journal.end(req, {"event": P.EV_CANCELLED, "pid": req.pid, "message": why, "text": req.text})
            if reschedule:
                self.schedule()

    def fail(self, req: Request, code: str, message: str) -> None:
        if req.worker is not None:
            self.to_worker(req.worker, M.Cancel(req.pid))
        self.terminal(req, State.FAILED, P.EV_ERROR, code=code, message=message, text=req.text)

    def retire(self, req: Request, state: State) -> dict:
        """Leave the scheduler and the tables; count it and tell the hooks (metrics).  The policy's last view."""
        if not req.finished:
            self.admission.release(req.owner, req.cost)
        policy_view = self.sched.finish(req, state)
        self.counters.finish(req.state.value)
        for hook in self.finish_hooks:
            try:
                hook(req)
            except Exception:
                log.exception("event=internal_error side=finish_hook pid=%s", req.pid)
        self.by_client.pop((req.agent_addr, req.client_id), None)
        self.sched.forget(req)
        return policy_view

    # ---- worker side --------------------------------------------------------------------
    def schedule(self) -> None:
        if self.stopping.is_set():
            self.drain.flush_queue()
            return
        for req in self.sched.schedule():
            self.worker_ops.start(req)

    def to_worker(self, name: str, msg: M.Message, frames: list | None = None) -> None:
        try:
            head = P.pack(msg.encode())
            self._workers_tx.send_multipart([name.encode(), head, *(frames or [])], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            log.warning("event=worker_unreachable worker=%s op=%s errno=%s", name, msg.OP, exc.errno)
        finally:
            # A send on the synchronous shadow may consume the edge of the socket's (edge-triggered) FD
            # that announced an incoming message; reading EVENTS through the asyncio socket makes its
            # pending receive look again, or that message would wait for the next edge (seen: a chat
            # left unread until the agent timed out).
            self.workers_sock.get(zmq.EVENTS)

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
