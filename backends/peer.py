"""Contexts sent straight from one worker to another: one socket hop instead of two.

A migrating context used to travel worker -> daemon -> worker.  Each hop through the kernel
costs about 4 ms for a 512-token SmolLM2 context here (22.7 MiB), so the relay doubled the
price of a move.  Now the exporting worker pushes the tensor frames to the importing worker's
inbox (a PULL socket beside the daemon's worker socket, same directory, same permissions) and
tells the daemon only that it did; the daemon's ``run`` then carries no frames.  The daemon
still decides every move and holds every request's tokens, so a lost or late push costs a
recompute, never output.  Where a worker has no inbox (a tcp:// worker endpoint, a bind that
failed) the daemon relays the frames as before.
"""

from __future__ import annotations

import logging
import os
import time

import zmq

from ipc import messages as M
from ipc import protocol as P
from ipc.tensor_frames import check

log = logging.getLogger("quantad.worker")

MAX_INBOX = 64  # contexts received and not yet claimed; the oldest goes first (its run fell back)
SEND_LINGER_MS = 5000  # a worker shutting down still delivers what it pushed


def inbox_endpoint(worker_endpoint: str, name: str) -> str | None:
    """The inbox beside an ``ipc://`` worker endpoint (same directory); None for other transports."""
    if not worker_endpoint.startswith("ipc://"):
        return None
    return f"{worker_endpoint}.{name}.peer"


class PeerLink:
    """This worker's inbox for contexts other workers push, and its pushes to theirs."""

    def __init__(self, ctx: zmq.Context, endpoint: str | None):
        self.ctx = ctx
        self.inbox: dict[int, tuple[list[dict], list]] = {}
        self._out: dict[str, zmq.Socket] = {}
        self.sock: zmq.Socket | None = None
        self.endpoint: str | None = None
        if endpoint is None:
            return
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVBUF, P.BULK_SOCKET_BUFFER)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_TENSOR_FRAME)
        old = os.umask(0o007)  # as the daemon binds its sockets: no chmod race
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            log.warning("no context inbox at %s (%s): migrations to this worker go through the daemon", endpoint, exc)
            sock.close(0)
            return
        finally:
            os.umask(old)
        self.sock, self.endpoint = sock, endpoint

    def push(self, endpoint: str, rid: int, specs: list[dict], frames: list) -> bool:
        """Queue a context for another worker's inbox; False when it cannot be queued now (relay it)."""
        sock = self._out.get(endpoint)
        try:
            if sock is None:
                sock = self.ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, SEND_LINGER_MS)
                sock.setsockopt(zmq.SNDBUF, P.BULK_SOCKET_BUFFER)
                sock.connect(endpoint)
                self._out[endpoint] = sock
            head = P.pack(M.Pushed(rid, specs).encode())
            sock.send_multipart([head, *frames], copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            log.warning("cannot push context %s to %s (%s): relaying it through the daemon", rid, endpoint, exc)
            return False

    def take(self) -> None:
        """Move every arrived context into the inbox; a malformed one is logged and dropped."""
        while self.sock is not None and self.sock.poll(0):
            frames = self.sock.recv_multipart(copy=False)
            try:
                pushed, rest = M.read(frames, M.PEER)
                specs = check(pushed.tensors, rest)
            except P.ProtocolError as exc:
                log.error("bad context from a peer: %s", exc.message)
                continue
            self.inbox[pushed.rid] = (specs, rest)
            while len(self.inbox) > MAX_INBOX:
                dropped = next(iter(self.inbox))
                log.warning("context %s was never claimed: dropped", dropped)
                del self.inbox[dropped]

    def claim(self, rid: int, timeout_s: float) -> tuple[list[dict], list] | None:
        """The context pushed for ``rid``, waiting up to ``timeout_s`` for it (None: recompute instead).

        The push and the daemon's ``run`` travel different paths, so the small ``run`` may arrive
        while the frames are still in transit (a few ms); a push lost with a dying worker never comes.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            self.take()
            if rid in self.inbox:
                return self.inbox.pop(rid)
            left = deadline - time.monotonic()
            if self.sock is None or left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                if self.sock is not None:
                    self.take()
                return self.inbox.pop(rid, None)

    def close(self) -> None:
        for s in self._out.values():
            s.close()
        if self.sock is not None:
            self.sock.close(0)
            if self.endpoint and self.endpoint.startswith("ipc://"):
                try:
                    os.unlink(self.endpoint[len("ipc://") :])
                except OSError:
                    pass
