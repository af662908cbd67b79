"""The worker process: one skeleton (socket, poll loop, heartbeats, dispatch) driving one engine.

``python -m backends.worker --backend hf|llamacpp|openai --endpoint W --name N --model M ...`` (every flag:
``ipc.worker_spec``).  One DEALER socket to the daemon and one loop: drain every pending daemon
message (each decoded once into an ``ipc.messages`` record and handed to the engine), let the
engine take one step while it has work (for a local engine: a budget of prefill and one batched
decode step), heartbeat between steps.  The engine (``backends.engine``) owns the requests and
their contexts and reports through ``send``; the skeleton knows no model.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import sys
import time

import zmq

from backends.engine import Engine
from ipc import credentials
from ipc import messages as M
from ipc import protocol as P
from ipc.logfmt import setup as setup_logging
from ipc.worker_spec import WorkerSpec

log = logging.getLogger("quantad.worker")

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>

ENGINES = {  # imported when chosen: an API worker never loads torch's model code, nor an HF one httpx
    "hf": ("backends.hf_engine", "HFEngine"),
    "llamacpp": ("backends.llamacpp_engine", "LlamaCppEngine"),
    "openai": ("backends.openai_engine", "ApiEngine"),
}


def build_engine(spec: WorkerSpec, send, ctx: zmq.Context) -> Engine:
    module, name = ENGINES[spec.backend]
    return getattr(importlib.import_module(module), name)(spec, send, ctx)


class Worker:
    def __init__(self, spec: WorkerSpec, creds: dict | None = None):
        self.spec = spec
        self.ctx = zmq.Context()
        self.engine = build_engine(spec, self.send, self.ctx)  # loads the model: the daemon hears of us when it is up
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, spec.name.encode())
        credentials.apply(self.sock, spec.name, creds or {})  # the daemon lets no one else in under this name
        for opt in (zmq.SNDBUF, zmq.RCVBUF):  # contexts leave and arrive through it when they migrate
            self.sock.setsockopt(opt, P.BULK_SOCKET_BUFFER)
        self.sock.connect(spec.endpoint)
        self.poller = zmq.Poller()
        for s in (self.sock, *self.engine.sockets()):
            self.poller.register(s, zmq.POLLIN)
        self.stop = False
        self._last_beat = 0.0

    def send(self, record: M.Message, frames: list | None = None) -> None:
        """One message to the daemon; raw frames (tensors) travel beside the record, zero copy."""
        if frames:
            self.sock.send_multipart([P.pack(record.encode()), *frames], copy=False)
        else:
            self.sock.send(P.pack(record.encode()))

    def serve(self) -> None:
        self.send(self.engine.ready())
        try:
            while not self.stop:
                self.turn()
        finally:
            self.engine.close()
            self.sock.close(0)
            self.ctx.term()

    def turn(self) -> None:
        """Wait for news (not at all while the engine has work), take it all in, then one step."""
        timeout = 0 if self.engine.has_work() else int(self.spec.heartbeat_s * 1000)
        if self.poller.poll(timeout):
            for s in self.engine.sockets():  # the engine's first: a ``run`` below may be for what came there
                if s.poll(0):
                    self.engine.on_readable(s)
            while self.sock.poll(0):
                self.dispatch(self.sock.recv_multipart(copy=False))
        if self.engine.has_work():
            self.engine.step()
        if time.monotonic() - self._last_beat >= self.spec.heartbeat_s:
            self._last_beat = time.monotonic()
            self.send(M.Heartbeat(stats=self.engine.stats()))

    def dispatch(self, frames: list) -> None:
        """One daemon message to the engine; a bad one is logged and dropped (the daemon gets no error)."""
        try:
            record, extra = M.read(frames, M.TO_WORKER)
            if isinstance(record, M.Run):
                self.engine.run(record, extra)
            elif isinstance(record, M.Continue):
                self.engine.keep(record)
            elif isinstance(record, M.Preempt):
                self.engine.preempt(record.rid)
            elif isinstance(record, M.Cancel):
                self.engine.cancel(record.rid)
            elif isinstance(record, M.Export):
                self.engine.export(record)
            elif isinstance(record, M.Shutdown):
                self.stop = True
        except P.ProtocolError as exc:
            log.error("bad message from daemon: %s", exc.message)


def die_with_parent() -> None:
    """A worker must not outlive the daemon that started it (one killed with SIGKILL tells no one).

    Linux's parent-death signal: when the parent exits, the kernel sends this process SIGTERM,
    and the worker stops as on any SIGTERM.  A parent already gone (we were re-parented) ends it now.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the daemon's heartbeat timeout still finds us silent
        return
    if os.getppid() == 1:
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    spec = WorkerSpec.parse(argv)
    die_with_parent()
    setup_logging(logging.INFO, worker=spec.name)  # the daemon's format ($QUANTAD_LOG_FORMAT), journald-aware
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when workers stop
    creds = credentials.read_stdin() if spec.credentials == "stdin" else None  # before the model loads
    worker = Worker(spec, creds)
    parent = os.getppid()

    def on_term(*_: object) -> None:
        if os.getppid() != parent:  # the daemon is gone (parent-death signal): no one to drain for
            os._exit(0)  # and a send to no peer would block the loop's exit
        worker.stop = True

    signal.signal(signal.SIGTERM, on_term)
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
