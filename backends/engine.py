"""The interface between the worker skeleton (``backends/worker.py``) and an engine.

The skeleton owns the process: its socket to the daemon, the heartbeats, decoding each daemon
message once into a record (``ipc.messages``) and dispatching it here.  An engine owns the
model: it runs requests, reports their progress through ``send`` and keeps their contexts.
Engines that need more sockets (a peer inbox, a thread's outbox) list them in ``sockets``;
the skeleton polls them with its own and calls ``on_readable``.  Everything runs on the
skeleton's thread: an engine that runs a thread of its own reports through a socket.

Every engine may count its requests' quanta with ``backends.quantum.QuantumMeter`` (tokens
and/or milliseconds, charged compute or wall time, ``ended``/``paused``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import zmq

from ipc import messages as M
from ipc.worker_spec import WorkerSpec

Send = Callable[..., None]  # send(record, frames=None): one message to the daemon


class Engine(ABC):
    """One model runtime behind the worker skeleton."""

    def __init__(self, spec: WorkerSpec, send: Send, ctx: zmq.Context):
        self.spec = spec
        self.send = send
        self.ctx = ctx

    @abstractmethod
    def ready(self) -> M.Ready:
        """What the worker tells the daemon when it is up: device, model, slots, capabilities."""

    @abstractmethod
    def run(self, run: M.Run, frames: list) -> None:
        """Start, resume, restart or import (``run.migrate``) a request."""

    @abstractmethod
    def keep(self, cont: M.Continue) -> None:
        """The daemon let a request keep its slot for one more quantum."""

    @abstractmethod
    def preempt(self, rid: int) -> None:
        """Save the request's context, free its slot, and send ``Preempted``."""

    @abstractmethod
    def cancel(self, rid: int) -> None:
        """Drop the request and whatever context it holds; nothing is sent."""

    @abstractmethod
    def export(self, exp: M.Export) -> None:
        """Hand a saved context over for migration: send ``Exported`` (with frames, or pushed to ``exp.peer``)."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """The heartbeat's figures (``contexts.tiers``, token counts, memory)."""

    def has_work(self) -> bool:
        """True while ``step`` has something to do now (the skeleton then polls without waiting)."""
        return False

    def step(self) -> None:  # noqa: B027 (optional: a no-op by default)
        """One scheduling step (a batched forward pass, for local engines)."""

    def sockets(self) -> list[zmq.Socket]:
        """More sockets for the skeleton to poll."""
        return []

    def on_readable(self, sock: zmq.Socket) -> None:  # noqa: B027 (optional: a no-op by default)
        """One of ``sockets`` has a message."""

    def close(self) -> None:  # noqa: B027 (optional: a no-op by default)
        """The worker is stopping."""
