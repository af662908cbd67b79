"""The scheduler daemon: two ROUTER sockets, one asyncio loop, one receive loop per socket.

Agents talk to the agent socket; workers (child processes started by command line)
talk to the worker socket.  Each receive loop decodes a frame and dispatches on its
``op``.  Bad input from an agent gets an ``error`` reply and the loop goes on.  A dead
worker's requests are re-queued from what the daemon holds: the chat, its parameters,
and every token already streamed, so nothing emitted is lost or repeated.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from ipc import protocol as P
from ipc.chat_params import parse_chat
from ipc.logfmt import under_journald
from ipc.tensor_frames import check, spec_bytes
from scheduler import sd_notify
from scheduler.config import ConfigError, Effective
from scheduler.core import Scheduler, WorkerSlots
from scheduler.counters import Counters
from scheduler.policy import Policy
from scheduler.request import Request, State
from scheduler.workers import WorkerProcess

log = logging.getLogger("quantad")

# Options a SIGHUP applies live; any other change is logged and waits for a restart.
POLICY_KEYS = {"quantum_ms", "quantum_tokens", "policy", "policy_opt"}
LIVE_KEYS = POLICY_KEYS | {"log_level", "liveness_s", "max_restarts", "grace_s"}
STATUS_PERIOD_S = 1.0


@dataclass
class DaemonConfig:
    endpoint: str
    worker_endpoint: str
    model_dir: str
    policy: Policy
    workers: int = 1
    slots: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    device_budget: int = 512 << 20
    host_budget: int = 4 << 30
    heartbeat_s: float = 1.0
    liveness_s: float = 30.0
    max_restarts: int = 5
    prefill_chunk: int = P.DEFAULT_PREFILL_CHUNK
    disk_budget: int = 8 << 30
    state_dir: str | None = None
    worker_args: list[str] = field(default_factory=list)
    backend: str = "hf"  # "openai": API workers; model_dir is then the remote model's name
    grace_s: float = 30.0  # SIGTERM: how long running requests may go on before they are cut
    log_format: str = "kv"  # passed on to the workers
    options: Effective | None = None  # the resolved serve options (for SIGHUP's diff)
    reload_options: Callable[[], Effective] | None = None  # re-reads the config file on SIGHUP
    build_policy: Callable[[argparse.Namespace], Policy] | None = None
    model_name: str = ""  # what /v1/models calls the model (a directory's name, or the remote name)
    model_aliases: tuple[str, ...] = ()  # other names an HTTP request may give (--model as given, the path)
    http: tuple[str, int] | None = None  # OpenAI-compatible HTTP front (host, port); None: off
    http_token: str | None = None  # bearer token the HTTP front requires
    metrics_port: int | None = None  # Prometheus /metrics on 127.0.0.1; None: off


class Daemon:
    def __init__(self, cfg: DaemonConfig):
        self.cfg = cfg
        self.sched = Scheduler(cfg.policy)
        self.ctx = zmq.asyncio.Context()
        self.agents = self._socket(P.MAX_FRAME)
        self.workers_sock = self._socket(P.MAX_TENSOR_FRAME)
        for opt in (zmq.SNDBUF, zmq.RCVBUF):  # migrations relay whole contexts through it
            self.workers_sock.setsockopt(opt, P.BULK_SOCKET_BUFFER)
        # Synchronous shadows: sends are non-blocking and fail here, where we can handle them.
        self._agents_tx = zmq.Socket.shadow(self.agents.underlying)
        self._workers_tx = zmq.Socket.shadow(self.workers_sock.underlying)
        self.procs: dict[str, WorkerProcess] = {}
        self.by_client: dict[tuple[bytes, Any], Request] = {}
        self.pids = itertools.count(1)
        self.seq = itertools.count(1)
        self.stopping = asyncio.Event()
        self.drained = asyncio.Event()  # draining: no request left, or a second signal
        self.ready = asyncio.Event()
        self._flushing = False
        self.last_seen: dict[str, float] = {}
        self.fatal: str | None = None
        self.dead: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self.sessions: dict[str, str] = {}  # session id -> worker keeping its context
        self.counters = Counters()
        self.finish_hooks: list[Callable[[Request], None]] = []  # called once per request, at its end
        self.urls: dict[str, str | None] = {"http": None, "metrics": None}
        self._fronts: list[Any] = []  # the HTTP front and the metrics server, when on

    def _socket(self, max_size: int) -> zmq.asyncio.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a peer reconnecting with its fixed id takes its place
        s.setsockopt(zmq.MAXMSGSIZE, max_size)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        return s

    # ---- life cycle ---------------------------------------------------------------------
    async def run(self) -> int:
        old = os.umask(0o007)  # sockets are created with this mode; no chmod race
        try:
            self.agents.bind(self.cfg.endpoint)
            self.workers_sock.bind(self.cfg.worker_endpoint)
        finally:
            os.umask(old)
        try:
            await self._start_fronts()
        except OSError as exc:  # port taken, address not here: fail before any worker starts
            log.error("event=fatal reason=%r", f"cannot listen: {exc}")
            await self._stop_fronts()
            self.agents.close(0)
            self.workers_sock.close(0)
            self.ctx.term()
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        env = {"QUANTAD_LOG_FORMAT": self.cfg.log_format}
        for i in range(self.cfg.workers):
            name = f"w{i}"
            self.sched.workers[name] = WorkerSlots(name, self.cfg.slots)
            self.procs[name] = WorkerProcess(name, self._worker_command(name), env)
            self.procs[name].start()
        tasks = [
            asyncio.create_task(self._agent_loop()),
            asyncio.create_task(self._worker_loop()),
            asyncio.create_task(self._supervise()),
            asyncio.create_task(self._status_loop()),
        ]
        period = sd_notify.watchdog_period()
        if period is not None:
            tasks.append(asyncio.create_task(self._watchdog(period)))
        log.info("event=listening endpoint=%s workers=%s", self.cfg.endpoint, self.cfg.workers)
        sd_notify.notify(self._status())
        await self.stopping.wait()
        rc = await self._shutdown()
        await self._stop_fronts()  # after the drain: HTTP streams have had their terminal events
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.agents.close(0)
        self.workers_sock.close(0)
        self.ctx.term()
        return rc

    async def _start_fronts(self) -> None:
        """The optional HTTP listeners; imported only when asked for, so a plain daemon starts as before."""
        c = self.cfg
        if c.metrics_port is not None:
            from scheduler.metrics import MetricsServer

            self._fronts.append(MetricsServer(self, c.metrics_port))
            self.urls["metrics"] = await self._fronts[-1].start()
            log.info("event=metrics_listening url=%s", self.urls["metrics"])
        if c.http is not None:
            from scheduler.http_front import HttpFront

            names = (c.model_name, *c.model_aliases)
            self._fronts.append(HttpFront(c.endpoint, c.http[0], c.http[1], names, c.http_token))
            self.urls["http"] = await self._fronts[-1].start()
            log.info("event=http_listening url=%s auth=%s", self.urls["http"], "bearer" if c.http_token else "none")

    async def _stop_fronts(self) -> None:
        for front in reversed(self._fronts):
            try:
                await front.stop()
            except Exception:
                log.exception("event=internal_error side=front_stop")
        self._fronts.clear()

    def _worker_command(self, name: str) -> list[str]:
        c = self.cfg
        if c.backend == "openai":
            return [
                sys.executable, "-m", "backends.openai_worker", "--endpoint", c.worker_endpoint, "--name", name,
                "--model", c.model_dir, "--slots", str(c.slots), "--heartbeat-s", str(c.heartbeat_s), *c.worker_args,
            ]  # fmt: skip
        return [
            sys.executable, "-m", "backends.worker",
            "--endpoint", c.worker_endpoint, "--name", name, "--model", c.model_dir,
            "--device", c.device, "--dtype", c.dtype, "--slots", str(c.slots),
            "--device-budget", str(c.device_budget), "--host-budget", str(c.host_budget),
            "--heartbeat-s", str(c.heartbeat_s), "--prefill-chunk", str(c.prefill_chunk),
            "--disk-budget", str(c.disk_budget),
            *(["--state-dir", os.path.join(c.state_dir, "contexts", name)] if c.state_dir else []),
            *c.worker_args,
        ]  # fmt: skip

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        """The first SIGTERM/SIGINT drains; a second one cuts the drain short."""
        if self.stopping.is_set():
            log.info("event=drain_cut signal=%s", sig.name)
            self.drained.set()
            return
        log.info("event=signal signal=%s", sig.name)
        self.stopping.set()

    async def _shutdown(self) -> int:
        """Drain: refuse new chats, answer the queue, let running requests finish within the grace period.

        Queued requests get an ``error`` (code ``shutting_down``) with their partial text at
        once; running ones go on, no longer preempted, until they end or the grace period
        (less a reserve for stopping the workers) runs out, then get the same error.
        """
        t0 = time.monotonic()
        grace = self.cfg.grace_s
        sd_notify.notify("STOPPING=1", self._status("stopping"))
        live = [r for r in self.sched.table.values() if not r.finished]
        log.info("event=draining grace_s=%s running=%s queued=%s", grace,
                 sum(r.state is State.RUNNING for r in live), len(self.sched.ready))  # fmt: skip
        self._flush_queue()
        if self.fatal is None:
            self._check_drained()
            reserve = min(2.0, grace / 4)
            try:
                await asyncio.wait_for(self.drained.wait(), max(0.0, grace - reserve - (time.monotonic() - t0)))
            except TimeoutError:
                pass
        for req in list(self.sched.table.values()):
            if not req.finished:
                log.info("event=drain_cut_request pid=%s tokens=%s", req.pid, req.generated)
                self._fail(req, P.E_SHUTTING_DOWN, "the daemon is shutting down; 'text' holds the partial answer")
        for name in self.procs:
            self._to_worker(name, P.D_SHUTDOWN)
        left = max(0.05, grace - 0.1 - (time.monotonic() - t0))  # then SIGKILL: exit within the grace period
        await asyncio.gather(*(p.stop(left) for p in self.procs.values()))
        log.info("event=stopped after_s=%.3f rc=%s", time.monotonic() - t0, 0 if self.fatal is None else 1)
        return 0 if self.fatal is None else 1

    def _flush_queue(self) -> None:
        """While draining, nothing new starts: every queued request gets its terminal reply now."""
        if self._flushing:
            return
        self._flushing = True
        try:
            for req in list(self.sched.ready):
                if not req.finished:
                    log.info("event=drain_queued pid=%s tokens=%s", req.pid, req.generated)
                    self._fail(req, P.E_SHUTTING_DOWN, "the daemon is shutting down; 'text' holds the partial answer")
        finally:
            self._flushing = False
        self._check_drained()

    def _check_drained(self) -> None:
        if self.stopping.is_set() and not any(not r.finished for r in self.sched.table.values()):
            self.drained.set()

    # ---- systemd ------------------------------------------------------------------------
    def _status(self, phase: str | None = None) -> str:
        live = [r for r in self.sched.table.values() if not r.finished]
        running = sum(r.state is State.RUNNING for r in live)
        alive = sum(w.alive for w in self.sched.workers.values())
        if phase is None:
            phase = "draining" if self.stopping.is_set() else "serving" if self.ready.is_set() else "starting"
        return (f"STATUS={phase}: {running} running, {len(live) - running} queued, "
                f"workers {alive}/{len(self.sched.workers)} up")  # fmt: skip

    async def _status_loop(self) -> None:
        last = None
        while True:
            self.counters.sample()
            status = self._status()
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

    def _reload(self) -> None:
        """SIGHUP: re-read the configuration; a bad file is rejected whole and the old settings stay."""
        sd_notify.notify("RELOADING=1", sd_notify.monotonic_usec(), "STATUS=reloading configuration")
        try:
            if self.cfg.reload_options is None or self.cfg.options is None:
                log.warning("event=reload_unsupported")
            else:
                self._apply(self.cfg.reload_options())
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("event=reload_rejected problem=%r", problem)
        except Exception:
            log.exception("event=internal_error side=reload")
        sd_notify.notify("READY=1", self._status())

    def _apply(self, new: Effective) -> None:
        old = self.cfg.options
        changes = new.changed_from(old)
        kept = dict(vars(old.values))
        sources = dict(old.sources)
        for key, (before, after) in sorted(changes.items()):
            if key in LIVE_KEYS:
                kept[key], sources[key] = after, new.sources.get(key, "?")
                log.info("event=config_changed key=%s old=%r new=%r source=%s", key, before, after, sources[key])
            else:
                log.warning("event=config_changed key=%s old=%r new=%r applied=no reason=needs_restart",
                            key, before, after)  # fmt: skip
        values = argparse.Namespace(**kept)
        self.cfg.options = Effective(values, sources, new.file)
        if POLICY_KEYS & changes.keys() and self.cfg.build_policy is not None:
            self.sched.policy = self.cfg.build_policy(values)
            for req in self.sched.table.values():  # the new policy starts from what is live now
                if not req.finished:
                    self.sched.policy.admit(req)
            for req in self.sched.table.values():  # running requests take the new quantum now
                if req.state is State.RUNNING and req.worker is not None and req.migrate_from is None:
                    q = self.sched.policy.quantum_for(req)
                    self._to_worker(req.worker, P.D_CONTINUE, rid=req.pid, quantum_tokens=q.tokens, quantum_ms=q.ms)
        if "log_level" in changes:
            logging.getLogger().setLevel(values.log_level)
        for key in ("liveness_s", "max_restarts", "grace_s"):
            if key in changes:
                setattr(self.cfg, key, getattr(values, key))
        q = self.sched.policy.quantum
        log.info("event=reloaded changed=%s policy=%s quantum_tokens=%s quantum_ms=%s", len(changes),
                 self.sched.policy.name, q.tokens, q.ms)  # fmt: skip

    async def _supervise(self) -> None:
        """Notice dead or silent workers, re-queue their requests, restart them."""
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s / 2)
            if self.stopping.is_set():
                return  # draining: workers are about to stop; the grace deadline answers what they held
            now = time.monotonic()
            for name, proc in self.procs.items():
                w = self.sched.workers[name]
                exited = proc.returncode is not None
                silent = w.alive and now - self.last_seen.get(name, now) > self.cfg.liveness_s
                if not (exited or silent) or name in self.dead:
                    continue
                log.warning("event=worker_lost worker=%s exit=%s silent=%s", name, proc.returncode, silent)
                if not self.ready.is_set():  # start-up failed (bad model, device, memory): restarts will not help
                    self.fatal = f"worker {name} exited with status {proc.returncode} during start-up"
                    log.error("event=fatal reason=%r", self.fatal)
                    self.stopping.set()
                    return
                if not exited:
                    await proc.kill()  # a wedged worker must not hold its routing id
                self._lose_worker(name)
                if self.stopping.is_set():
                    self.dead.add(name)
                elif proc.restarts < self.cfg.max_restarts:
                    await proc.restart()
                else:
                    self.dead.add(name)
            if len(self.dead) == len(self.procs):
                self.fatal = "every worker died more often than --max-restarts allows; see the worker log above"
                log.error("event=fatal reason=%r", self.fatal)
                self.stopping.set()
                return

    def _lose_worker(self, name: str) -> None:
        self.last_seen.pop(name, None)
        self.sessions = {s: w for s, w in self.sessions.items() if w != name}
        for req in list(self.sched.table.values()):
            if req.migrate_from == name and not req.finished:  # its context died with the exporter
                req.migrate_from = None
                self._restart_on(req)
        for req in self.sched.worker_lost(name):
            log.info("event=requeue pid=%s tokens=%s", req.pid, len(req.tokens))
        self._schedule()

    # ---- agent side ---------------------------------------------------------------------
    async def _agent_loop(self) -> None:
        while True:
            frames = await self.agents.recv_multipart(copy=True)
            await asyncio.sleep(0)  # a ready recv does not yield: let the other socket's loop run
            try:
                self._on_agent(frames)
            except Exception:  # a bug must not stop the loop; the agent still gets an answer
                log.exception("event=internal_error side=agent")
                if len(frames) >= 2:
                    self._send_agent(frames[0], {"event": P.EV_ERROR, "id": None, "code": P.E_INTERNAL,
                                                 "message": "internal error"})  # fmt: skip

    def _on_agent(self, frames: list[bytes]) -> None:
        addr = frames[0]
        cid = None
        try:
            if len(frames) != 2:
                raise P.ProtocolError(P.E_BAD_FRAME, f"expected 1 frame after the routing id, got {len(frames) - 1}")
            msg = P.unpack(frames[1])
            cid = msg.get("id")
            if isinstance(cid, bool) or not isinstance(cid, (str, int, type(None))):
                cid = None
                raise P.ProtocolError(P.E_BAD_FIELD, "field 'id' must be a string or an integer")
            handler = {
                P.OP_CHAT: self._op_chat,
                P.OP_PS: self._op_ps,
                P.OP_KILL: self._op_kill,
                P.OP_CANCEL: self._op_cancel,
                P.OP_PING: self._op_ping,
                P.OP_NICE: self._op_nice,
                P.OP_STATS: self._op_stats,
                P.OP_WORKERS: self._op_workers,
            }.get(msg["op"])
            if handler is None:
                raise P.ProtocolError(P.E_UNKNOWN_OP, f"unknown op {msg['op']!r}; known: {', '.join(P.AGENT_OPS)}")
            handler(addr, cid, msg)
        except P.ProtocolError as exc:
            log.info("event=bad_input id=%r code=%s message=%r", cid, exc.code, exc.message)
            self._send_agent(addr, {"event": P.EV_ERROR, "id": cid, "code": exc.code, "message": exc.message})

    def _op_chat(self, addr: bytes, cid: Any, msg: dict) -> None:
        if cid is None:
            raise P.ProtocolError(P.E_BAD_FIELD, "a chat needs an 'id' (string or integer) chosen by the agent")
        if (addr, cid) in self.by_client:
            raise P.ProtocolError(P.E_DUPLICATE_ID, f"request id {cid!r} is already in flight")
        if self.stopping.is_set():
            raise P.ProtocolError(P.E_SHUTTING_DOWN, "the daemon is shutting down")
        params = parse_chat(msg)
        if params["seed"] is None:  # fix the seed now so any restart samples the same stream
            params["seed"] = random.getrandbits(63)
        req = Request(pid=next(self.pids), agent_addr=addr, client_id=cid, params=params)
        home = self.sessions.get(params["session"])
        if home is not None and self.sched.workers[home].alive:
            req.worker = home  # affinity: that worker holds the session's context
        self.by_client[(addr, cid)] = req
        self.sched.add(req)
        self.counters.accepted += 1
        log.info("event=accepted pid=%s id=%r agent=%r max_tokens=%s", req.pid, cid, req.agent, params["max_tokens"])
        self._emit(req, P.EV_ACCEPTED, pid=req.pid)
        self._schedule()

    def _op_ps(self, addr: bytes, cid: Any, msg: dict) -> None:
        policy = self.sched.policy
        rows = [r.row() | policy.info(r) for r in self.sched.table.values() if not r.finished]
        workers = [
            {"name": w.name, "alive": w.alive, "slots": w.slots, "running": sorted(w.running), **w.info}
            for w in self.sched.workers.values()
        ]
        q = self.sched.policy.quantum
        self._reply(addr, cid, {"requests": rows, "workers": workers, "policy": self.sched.policy.name,
                                "quantum": {"tokens": q.tokens, "ms": q.ms}})  # fmt: skip

    def _op_stats(self, addr: bytes, cid: Any, msg: dict) -> None:
        self._reply(addr, cid, self.stats_view())

    def _op_workers(self, addr: bytes, cid: Any, msg: dict) -> None:
        self._reply(addr, cid, {"workers": self.workers_view(), "heartbeat_s": self.cfg.heartbeat_s,
                                "liveness_s": self.cfg.liveness_s})  # fmt: skip

    def stats_view(self) -> dict[str, Any]:
        """The ``stats`` reply: daemon-wide counts (also what the metrics and ``quantad top`` read)."""
        live = [r for r in self.sched.table.values() if not r.finished]
        by_state = {State.READY.value: 0, State.RUNNING.value: 0}
        for r in live:
            by_state[r.state.value] = by_state.get(r.state.value, 0) + 1
        q = self.sched.policy.quantum
        phase = "draining" if self.stopping.is_set() else "serving" if self.ready.is_set() else "starting"
        return {
            "phase": phase,
            "uptime_s": round(time.monotonic() - self.counters.started_at, 3),
            "started_at": round(self.counters.started_wall, 3),
            "policy": self.sched.policy.name,
            "quantum": {"tokens": q.tokens, "ms": q.ms},
            "model": self.cfg.model_name,
            "backend": self.cfg.backend,
            "queue": len(self.sched.ready),
            "requests": by_state,
            **self.counters.as_dict(),
            "tokens_per_s": round(self.counters.tokens_per_s(), 3),
            "workers": {"configured": len(self.sched.workers), "up": sum(w.alive for w in self.sched.workers.values())},
            "endpoints": {"agents": self.cfg.endpoint, **self.urls},
        }

    def workers_view(self) -> list[dict[str, Any]]:
        """One row per worker for the ``workers`` reply, from its ``ready`` and its last heartbeat."""
        now = time.monotonic()
        rows = []
        for name, w in self.sched.workers.items():
            stats = _map(w.info.get("stats"))
            tiers = _map(_map(stats.get("contexts")).get("tiers"))
            seen = self.last_seen.get(name)
            rows.append({
                "name": name,
                "state": "up" if w.alive else "dead" if name in self.dead else "starting",
                "alive": w.alive,
                "pid": w.info.get("pid"),
                "device": w.info.get("device"),
                "model": w.info.get("model"),
                "backend": self.cfg.backend,
                "slots": w.slots,
                "used": len(w.running),
                "running": sorted(w.running),
                "heartbeat_age_s": None if seen is None else round(now - seen, 3),
                "restarts": self.procs[name].restarts if name in self.procs else 0,
                "memory": {t: _int(_map(tiers.get(t)).get("bytes")) for t in P.TIERS},
                "contexts": {t: _int(_map(tiers.get(t)).get("count")) for t in P.TIERS},
                "rss_bytes": _int(stats.get("rss_bytes"), None),
                "host_available_bytes": _int(stats.get("host_available_bytes"), None),
                "prefill_tokens": _int(stats.get("prefill_tokens"), None),
                "decode_tokens": _int(stats.get("decode_tokens"), None),
            })  # fmt: skip
        return rows

    def _op_kill(self, addr: bytes, cid: Any, msg: dict) -> None:
        pid = P.field(msg, "pid", int)
        req = self.sched.table.get(pid)
        if req is None or req.finished:
            raise P.ProtocolError(P.E_NOT_FOUND, f"no live request with pid {pid}")
        self._cancel(req, "killed")
        self._reply(addr, cid, {"killed": pid})

    def _op_nice(self, addr: bytes, cid: Any, msg: dict) -> None:
        pid = P.field(msg, "pid", int)
        nice = P.number(msg, "nice", P.NICE_MIN, P.NICE_MAX, ..., integer=True)
        req = self.sched.table.get(pid)
        if req is None or req.finished:
            raise P.ProtocolError(P.E_NOT_FOUND, f"no live request with pid {pid}")
        old = req.nice
        self.sched.renice(req, nice)
        log.info("event=renice pid=%s old=%s nice=%s", pid, old, nice)
        self._reply(addr, cid, {"pid": pid, "nice": nice, "old": old})

    def _op_cancel(self, addr: bytes, cid: Any, msg: dict) -> None:
        req = self.by_client.get((addr, cid))
        if req is None:
            raise P.ProtocolError(P.E_NOT_FOUND, f"no request with id {cid!r} in flight")
        self._cancel(req, "cancelled by agent")

    def _op_ping(self, addr: bytes, cid: Any, msg: dict) -> None:
        """``wait: true`` holds the answer until every worker is up (clients wait on an event, not a timer)."""
        if P.field(msg, "wait", bool, False) and not self.ready.is_set():
            self._background(self._pong_when_ready(addr, cid))
            return
        self._pong(addr, cid)

    async def _pong_when_ready(self, addr: bytes, cid: Any) -> None:
        await self.ready.wait()
        self._pong(addr, cid)

    def _pong(self, addr: bytes, cid: Any) -> None:
        alive = sum(w.alive for w in self.sched.workers.values())
        self._reply(addr, cid, {"pong": True, "workers": len(self.sched.workers), "workers_ready": alive})

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reply(self, addr: bytes, cid: Any, data: dict) -> None:
        self._send_agent(addr, {"event": P.EV_REPLY, "id": cid, "data": data})

    def _send_agent(self, addr: bytes, msg: dict) -> bool:
        msg["seq"] = next(self.seq)
        try:
            self._agents_tx.send_multipart([addr, P.pack(msg)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: agent gone; EAGAIN: agent not reading
            log.info("event=agent_gone errno=%s", exc.errno)
            for req in [r for r in self.sched.table.values() if r.agent_addr == addr and not r.finished]:
                self._cancel(req, "agent disconnected", notify=False)
            return False
        finally:
            self.agents.get(zmq.EVENTS)  # re-arm the pending receive: see _to_worker

    def _emit(self, req: Request, event: str, **fields: Any) -> None:
        if not req.params["stream"] and event in (P.EV_TOKEN, P.EV_PREEMPTED, P.EV_RESUMED):
            return
        self._send_agent(req.agent_addr, {"event": event, "id": req.client_id, "pid": req.pid, **fields})

    def _terminal(self, req: Request, state: State, event: str, **fields: Any) -> None:
        """The one terminal reply of a request: leave the tables, then tell the agent."""
        policy_view = self.sched.finish(req, state)
        self._finished(req)
        self.by_client.pop((req.agent_addr, req.client_id), None)
        self.sched.forget(req)
        fields["stats"] = req.stats() | policy_view | fields.get("stats", {})
        self._emit(req, event, **fields)
        self._schedule()
        self._check_drained()

    def _cancel(self, req: Request, why: str, notify: bool = True) -> None:
        if req.finished:
            return
        if req.worker is not None:
            self._to_worker(req.worker, P.D_CANCEL, rid=req.pid)
        log.info("event=cancelled pid=%s why=%r", req.pid, why)
        if notify:
            self._terminal(req, State.CANCELLED, P.EV_CANCELLED, message=why, text=req.text)
        else:
            self.sched.finish(req, State.CANCELLED)
            self._finished(req)
            self.by_client.pop((req.agent_addr, req.client_id), None)
            self.sched.forget(req)
            self._schedule()

    def _finished(self, req: Request) -> None:
        """Count a request that just reached its terminal state, and tell the hooks (metrics)."""
        self.counters.finish(req.state.value)
        for hook in self.finish_hooks:
            try:
                hook(req)
            except Exception:
                log.exception("event=internal_error side=finish_hook pid=%s", req.pid)

    def _fail(self, req: Request, code: str, message: str) -> None:
        if req.worker is not None:
            self._to_worker(req.worker, P.D_CANCEL, rid=req.pid)
        self._terminal(req, State.FAILED, P.EV_ERROR, code=code, message=message, text=req.text)

    # ---- scheduling ---------------------------------------------------------------------
    def _schedule(self) -> None:
        if self.stopping.is_set():
            self._flush_queue()
            return
        for req in self.sched.schedule():
            if req.migrate_from is not None:  # its context comes from another worker first
                log.info("event=migrate pid=%s from=%s to=%s", req.pid, req.migrate_from, req.worker)
                peer = self.sched.workers[req.worker].info.get("peer")  # the importer's inbox: one hop, not two
                self._to_worker(req.migrate_from, P.D_EXPORT, rid=req.pid, **({"peer": peer} if peer else {}))
                continue
            req.preemptible = self.sched.workers[req.worker].info.get("preemptible", True)
            self._send_run(req)  # carries all a worker without the context needs to rebuild it
            if req.quanta > 0 and req.tier != P.TIER_NONE:
                req.note_moved(req.tier, req.context_bytes)  # restored from there
            if req.quanta > 0:  # after ``run``: if the agent is gone, the cancel follows the run
                self._emit(req, P.EV_RESUMED, worker=req.worker, context=req.tier)

    def _to_worker(self, name: str, op: str, frames: list | None = None, **fields: Any) -> None:
        fields["op"] = op
        try:
            self._workers_tx.send_multipart([name.encode(), P.pack(fields), *(frames or [])], flags=zmq.NOBLOCK,
                                            copy=False)  # fmt: skip
        except zmq.ZMQError as exc:
            log.warning("event=worker_unreachable worker=%s op=%s errno=%s", name, op, exc.errno)
        finally:
            # A send on the synchronous shadow may consume the edge of the socket's (edge-triggered) FD
            # that announced an incoming message; reading EVENTS through the asyncio socket makes its
            # pending receive look again, or that message would wait for the next edge (seen: a chat
            # left unread until the agent timed out).
            self.workers_sock.get(zmq.EVENTS)

    # ---- worker side --------------------------------------------------------------------
    async def _worker_loop(self) -> None:
        while True:
            frames = await self.workers_sock.recv_multipart(copy=False)
            await asyncio.sleep(0)  # a flood of worker tokens must not starve the agents
            try:
                self._on_worker(frames)
            except P.ProtocolError as exc:
                log.error("event=bad_worker_message code=%s message=%r", exc.code, exc.message)
            except Exception:
                log.exception("event=internal_error side=worker")

    def _on_worker(self, frames: list) -> None:
        name = frames[0].bytes.decode("utf-8", "replace")
        if name not in self.sched.workers or len(frames) < 2:
            raise P.ProtocolError(P.E_BAD_FRAME, f"message from unknown worker {name!r}")
        msg = P.unpack(frames[1].bytes, max_size=P.MAX_FRAME)
        self.last_seen[name] = time.monotonic()
        op = msg["op"]
        if op == P.W_READY:
            self._worker_ready(name, msg)
            return
        if op == P.W_HEARTBEAT:
            self.sched.workers[name].info["stats"] = P.field(msg, "stats", dict, {})
            return
        req = self.sched.table.get(P.field(msg, "rid", int))
        if op == P.W_EXPORTED:
            if req is not None and not req.finished and req.migrate_from == name:
                self._w_exported(req, msg, frames[2:])
            return
        if req is None or req.finished or req.worker != name:
            return  # late news of a cancelled or re-queued request
        handler = {
            P.W_TOKENS: self._w_tokens,
            P.W_QUANTUM_END: self._w_quantum_end,
            P.W_PREEMPTED: self._w_preempted,
            P.W_FINISHED: self._w_finished,
            P.W_FAILED: self._w_failed,
            P.W_CONTEXT: self._w_context,
        }.get(op)
        if handler is None:
            raise P.ProtocolError(P.E_UNKNOWN_OP, f"unknown worker op {op!r}")
        handler(req, msg)

    def _worker_ready(self, name: str, msg: dict) -> None:
        w = self.sched.workers[name]
        if w.alive or any(r.worker == name for r in self.sched.table.values()):
            self._lose_worker(name)  # it restarted: whatever it held is gone
        w.alive = True
        w.slots = P.field(msg, "slots", int, self.cfg.slots)
        w.info = {"device": P.field(msg, "device", str, "?"), "pid": P.field(msg, "pid", int, 0),
                  "model": P.field(msg, "model", str, ""),
                  "preemptible": P.field(msg, "preemptible", bool, True),
                  "peer": P.field(msg, "peer", str, None)}  # fmt: skip
        log.info("event=worker_ready worker=%s device=%s slots=%s", name, w.info["device"], w.slots)
        if all(x.alive for x in self.sched.workers.values()) and not self.ready.is_set():
            self.ready.set()
            log.info("event=ready endpoint=%s", self.cfg.endpoint)
            sd_notify.notify("READY=1", self._status())
            if not under_journald():  # for a person (and scripts) watching a terminal
                print(f"quantad: ready on {self.cfg.endpoint}", file=sys.stderr, flush=True)
        self._schedule()

    def _w_exported(self, req: Request, msg: dict, frames: list) -> None:
        """Relay a migrating context, frames untouched (zero copy), to the worker that runs it."""
        req.migrate_from = None
        try:
            if P.field(msg, "lost", bool, False):
                raise P.ProtocolError(P.E_NOT_FOUND, "the exporting worker no longer had the context")
            state = P.field(msg, "migrate", dict)
            direct = state.get("direct") is True  # the frames went straight to the importer's inbox
            specs = P.field(msg, "tensors", list, [])
            nbytes = spec_bytes(specs) if direct else sum(len(f) for f in frames)
            if not direct:
                specs = check(specs, frames)
        except P.ProtocolError as exc:  # rebuild from the tokens instead
            log.warning("event=migrate_fallback pid=%s why=%r", req.pid, exc.message)
            self._restart_on(req)
            return
        req.note_moved("network", nbytes)  # migrated between workers
        if direct:
            self._send_run(req, migrate=state)
        else:
            self._send_run(req, frames=frames, migrate=state, tensors=specs)
        self._emit(req, P.EV_RESUMED, worker=req.worker, context=req.tier, migrated=True, direct=direct)

    def _send_run(self, req: Request, frames: list | None = None, **extra: Any) -> None:
        q = self.sched.policy.quantum_for(req)
        self._to_worker(req.worker, P.D_RUN, frames=frames, rid=req.pid, quantum_tokens=q.tokens, quantum_ms=q.ms,
                        params=req.params, resume_ids=req.tokens, emitted_chars=len(req.text), resume_text=req.text,
                        resume_tokens=req.generated, **extra)  # fmt: skip

    def _restart_on(self, req: Request) -> None:
        """Run a request on its assigned worker from its streamed tokens (context lost)."""
        req.tier, req.context_bytes = P.TIER_NONE, 0
        req.restarts += 1
        self._send_run(req)

    def _w_tokens(self, req: Request, msg: dict) -> None:
        ids = P.field(msg, "ids", list)
        text = P.field(msg, "text", str, "")
        if req.first_token_s is None and (ids or text):
            req.first_token_s = time.monotonic() - req.submitted_at
        req.tokens.extend(int(t) for t in ids)
        n = max(0, P.field(msg, "n", int, len(ids)))  # API workers count tokens without ids
        req.generated += n
        self.counters.tokens += n
        req.text += text
        if text or ids:
            self._emit(req, P.EV_TOKEN, text=text, token_ids=ids, index=req.generated)

    def _w_quantum_end(self, req: Request, msg: dict) -> None:
        req.preemptible = P.field(msg, "preemptible", bool, req.preemptible)
        req.prompt_tokens = max(0, P.field(msg, "prompt_tokens", int, req.prompt_tokens))  # exact, from the tokenizer
        preempt = self.sched.quantum_end(req, P.field(msg, "emitted", int)) and req.preemptible is not False
        req.preempt_pending = preempt  # a request that cannot be resumed runs to the end of its turn
        if preempt:
            self._to_worker(req.worker, P.D_PREEMPT, rid=req.pid)
        else:
            q = self.sched.policy.quantum_for(req)
            self._to_worker(req.worker, P.D_CONTINUE, rid=req.pid, quantum_tokens=q.tokens, quantum_ms=q.ms)

    def _w_preempted(self, req: Request, msg: dict) -> None:
        req.tier = P.field(msg, "tier", str)
        req.context_bytes = P.field(msg, "bytes", int, 0)
        req.switch_s += float(P.field(msg, "switch_s", (int, float), 0.0))
        req.note_moved(req.tier, req.context_bytes)
        self.sched.preempt(req)
        self.counters.preemptions += 1
        log.info("event=preempted pid=%s tier=%s bytes=%s", req.pid, req.tier, req.context_bytes)
        self._emit(req, P.EV_PREEMPTED, quantum=req.quanta, tokens=req.generated, context=req.tier)
        self._schedule()

    def _w_context(self, req: Request, msg: dict) -> None:
        req.tier = P.field(msg, "tier", str)
        req.context_bytes = P.field(msg, "bytes", int, 0)
        req.note_moved(req.tier, req.context_bytes)

    def _w_finished(self, req: Request, msg: dict) -> None:
        req.quanta += 1
        usage = P.field(msg, "usage", dict, {})
        if isinstance(usage.get("prompt_tokens"), int) and not isinstance(usage["prompt_tokens"], bool):
            req.prompt_tokens = max(0, usage["prompt_tokens"])
        if P.field(msg, "session_kept", bool, False):
            self.sessions[req.params["session"]] = req.worker
        log.info("event=done pid=%s tokens=%s quanta=%s preemptions=%s", req.pid, req.generated,
                 req.quanta, req.preemptions)  # fmt: skip
        self._terminal(
            req,
            State.DONE,
            P.EV_DONE,
            text=req.text,
            finish_reason=P.field(msg, "finish_reason", str),
            content=P.field(msg, "content", str, None),
            tool_calls=P.field(msg, "tool_calls", list, []),
            usage=usage,
            stats=P.field(msg, "stats", dict, {}),
        )

    def _w_failed(self, req: Request, msg: dict) -> None:
        code = P.field(msg, "code", str, P.E_WORKER_FAILED)
        code = code if code in P.WORKER_CODES else P.E_WORKER_FAILED
        self._fail(req, code, P.field(msg, "message", str, "worker failed"))


def _map(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _int(value: Any, default: int | None = 0) -> int | None:
    """A count from a worker's heartbeat, which the daemon never trusts to be well-typed."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def serve(cfg: DaemonConfig) -> int:
    return asyncio.run(Daemon(cfg).run())
