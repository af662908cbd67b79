"""Who is at the other end of each connection: the daemon's ZAP handler (``zmq.auth``).

ZeroMQ asks it once per connection, before any message flows, and stamps every message of
an accepted connection with the ``User-Id`` it answered; the daemon reads identities only
from there, never from what a peer says of itself.

* Worker socket (domain ``workers``): PLAIN with the worker's name and the secret the daemon
  handed it on stdin (``ipc.credentials``), or CURVE with a key the daemon minted for a worker
  it started or a remote worker's key on the allow-list.  Identity ``worker:NAME``.  Nothing
  else gets in; the routing id must then match the name (``Daemon._from_worker``).
* Agent socket (domain ``agents``): on ``ipc://`` the peer's Unix uid, which ZeroMQ reads from
  the socket itself (SO_PEERCRED; the ZAP address is ``host:uid:gid:pid``): ``uid:N``; with
  CURVE the client's public key, if allowed: ``key:Z85``; on a plaintext loopback ``tcp://``
  endpoint every connection is the one identity ``tcp:loopback``.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

log = logging.getLogger("quantad")

WORKERS, AGENTS = b"workers", b"agents"  # the two sockets' ZAP domains


@dataclass
class Keys:
    """CURVE material: the daemon's key pair and who may connect with which key."""

    public: bytes = b""
    secret: bytes = b""
    agents: dict[bytes, bool] = field(default_factory=dict)  # Z85 public key -> admin
    workers: dict[bytes, str] = field(default_factory=dict)  # Z85 public key -> worker name


class Gate(AsyncioAuthenticator):
    def __init__(self, ctx: zmq.Context, agent_transport: str, keys: Keys | None = None):
        super().__init__(ctx, log=logging.getLogger("quantad.zap"))
        self.agent_transport = agent_transport  # "ipc" or "tcp"
        self.keys = keys or Keys()
        self.worker_secrets: dict[str, str] = {}
        self._minted: dict[str, bytes] = {}  # worker name -> the CURVE key minted at its last start
        self.admin_uids = {os.getuid(), 0}
        self.denied = 0
        self.connections = 0  # agent connections open now (the daemon's socket monitor counts them)
        self.max_connections = 0  # 0: no limit
        self._monitor: zmq.Socket | None = None  # the agent socket's monitor, while ``count`` runs

    # ---- what workers the daemon starts get -------------------------------------------------
    def mint(self, name: str, curve: bool) -> dict:
        """Fresh credentials for worker ``name`` (at every start: a restarted worker gets new ones)."""
        if curve:
            public, secret = zmq.curve_keypair()
            self.keys.workers.pop(self._minted.get(name, b""), None)  # the previous start's key is void
            self.keys.workers[public] = name
            self._minted[name] = public
            server = self.keys.public.decode()
            return {"curve": {"server": server, "public": public.decode(), "secret": secret.decode()}}
        self.worker_secrets[name] = secrets.token_urlsafe(32)
        return {"plain": self.worker_secrets[name]}

    # ---- identities ---------------------------------------------------------------------------
    def is_admin(self, identity: str | None) -> bool:
        kind, _, value = (identity or "").partition(":")
        if kind == "uid":
            return value.isdigit() and int(value) in self.admin_uids
        return kind == "key" and self.keys.agents.get(value.encode(), False)

    def verdict(self, domain: bytes, address: bytes, mechanism: bytes, creds: list[bytes]) -> str | None:
        """The identity of a new connection, or None to refuse it."""
        if domain == WORKERS:
            if mechanism == b"PLAIN" and len(creds) == 2:
                name = creds[0].decode(errors="replace")
                expected = self.worker_secrets.get(name)
                if expected is not None and hmac.compare_digest(expected.encode(), creds[1]):
                    return f"worker:{name}"
            elif mechanism == b"CURVE" and len(creds) == 1:
                name = self.keys.workers.get(z85.encode(creds[0]))
                if name is not None:
                    return f"worker:{name}"
            return None
        if domain == AGENTS:
            self._read_monitor()
            if self.max_connections and self.connections > self.max_connections:  # this one is counted too
                return None
            if mechanism == b"CURVE" and len(creds) == 1:
                key = z85.encode(creds[0])
                return f"key:{key.decode()}" if key in self.keys.agents else None
            if mechanism == b"NULL":
                if self.agent_transport == "ipc":
                    parts = address.decode(errors="replace").rsplit(":", 3)
                    return f"uid:{parts[1]}" if len(parts) == 4 and parts[1].isdigit() else None
                return "tcp:loopback"
        return None

    async def count(self, sock: zmq.Socket) -> None:
        """Connections open on ``sock`` now, from its monitor (``max_connections`` refuses one over).

        A connection's ``ACCEPTED`` event is queued before its ZAP request, so ``verdict`` reads
        what the monitor holds before it judges: the count it sees includes the one asking.
        """
        mon = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._monitor = zmq.Socket.shadow(mon.underlying)  # read without waiting, from verdict too
        try:
            while True:
                await mon.poll()  # no timeout: ``poll(zmq.POLLIN)`` would be a 1 ms one
                self._read_monitor()
        finally:
            self._monitor = None
            sock.disable_monitor()
            mon.close(0)

    def _read_monitor(self) -> None:
        """Apply every connection event the monitor holds now."""
        from zmq.utils.monitor import parse_monitor_message

        while self._monitor is not None:
            try:
                ev = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self.connections += 1 if ev["event"] == zmq.EVENT_ACCEPTED else -1

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) < 6:
            if len(msg) >= 2:
                self._send_zap_reply(msg[1], b"400", b"Not enough frames")
            return
        _, request_id, domain, address, _, mechanism = msg[:6]
        user = self.verdict(domain, address, mechanism, msg[6:])
        if user is None:
            self.denied += 1
            log.info("event=connection_refused domain=%.20r mechanism=%.10r address=%.60r", domain, mechanism, address)
            self._send_zap_reply(request_id, b"400", b"not allowed")
        else:
            self._send_zap_reply(request_id, b"200", b"OK", user)


def uses_curve(endpoint: str, keys: Keys | None) -> bool:
    """A ``tcp://`` endpoint speaks CURVE whenever the daemon has keys (``--curve-dir``)."""
    return endpoint.startswith("tcp://") and keys is not None and bool(keys.secret)


def load_keys(d: Path) -> Keys:
    """``--curve-dir``: the daemon's pair and the allowed public keys (``quantad keygen`` writes them)."""
    pair = d / "server.key_secret"
    if not pair.is_file():
        raise SystemExit(f"quantad: no {pair}; make it with 'quantad keygen {d} --name server'")
    if pair.stat().st_mode & 0o077:
        raise SystemExit(f"quantad: {pair} is readable by others; chmod 600 it")
    public, secret = zmq.auth.load_certificate(pair)
    keys = Keys(public=public, secret=secret or b"")

    def public_keys(sub: str) -> dict[bytes, str]:
        folder = d / sub
        if not folder.is_dir():
            return {}
        return {zmq.auth.load_certificate(f)[0]: f.stem for f in sorted(folder.glob("*.key"))}

    keys.agents = {k: False for k in public_keys("clients")} | {k: True for k in public_keys("admins")}
    keys.workers = public_keys("workers")
    return keys
