"""How much one identity or one connection may ask of the daemon, each limit with its own error code.

Per identity (``scheduler.gate``): live requests (queued and running) and the tokens they may
cost (estimated prompt + ``max_tokens``): ``quota_exceeded``.  Per connection: messages per
second, a token bucket: ``rate_limited``.  Admins (the daemon's own uid, root, admin keys;
the HTTP front connects as the daemon) are held to the per-connection rate only.  Replies a
connection leaves unread are bounded by the socket (``max_unread``: ZeroMQ's send high-water
mark per peer); past it the daemon cancels that connection's requests instead of buffering.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

from ipc import protocol as P


@dataclass(frozen=True)
class Limits:
    requests_per_identity: int = 512  # live requests (queued + running)
    tokens_per_identity: int = 4_000_000  # estimated prompt + max_tokens over its live requests
    messages_per_s: float = 2000.0  # per connection, sustained
    burst: int = 5000  # per connection, at once
    max_unread: int = 10_000  # replies buffered for one connection before it counts as not reading
    max_connections: int = 1000  # agent connections at once; more are refused at the handshake (``gate``)

    def __post_init__(self) -> None:
        if (
            min(self.requests_per_identity, self.tokens_per_identity, self.burst, self.max_unread, self.max_connections)
            < 1
        ):
            raise ValueError("limits must be >= 1")
        if self.messages_per_s <= 0:
            raise ValueError("messages_per_s must be > 0")


class Admission:
    """The counters behind ``Limits``: consulted on every message and chat, updated at each request's end."""

    IDLE_S = 60.0  # a connection's bucket is forgotten after this long without a message

    def __init__(self, limits: Limits):
        self.limits = limits
        self.live: dict[str, int] = defaultdict(int)  # identity -> live requests
        self.tokens: dict[str, int] = defaultdict(int)  # identity -> their estimated cost
        self.buckets: dict[bytes, tuple[float, float]] = {}  # connection -> (tokens left, last refill)
        self.refused = {P.E_QUOTA: 0, P.E_RATE_LIMITED: 0}

    def message(self, addr: bytes, now: float | None = None) -> None:
        """One message from ``addr``: spend a token of its bucket, or ``rate_limited``."""
        lim, now = self.limits, time.monotonic() if now is None else now
        left, last = self.buckets.get(addr, (float(lim.burst), now))
        left = min(float(lim.burst), left + (now - last) * lim.messages_per_s)
        if left < 1.0:
            self.buckets[addr] = (left, now)
            self.refused[P.E_RATE_LIMITED] += 1
            raise P.ProtocolError(P.E_RATE_LIMITED, f"more than {lim.messages_per_s:g} messages/s on this connection")
        self.buckets[addr] = (left - 1.0, now)

    def admit(self, identity: str, cost: int, admin: bool) -> None:
        """A new chat of ``identity`` costing ``cost`` tokens: count it, or ``quota_exceeded``."""
        lim = self.limits
        if not admin:
            if self.live[identity] >= lim.requests_per_identity:
                self.refused[P.E_QUOTA] += 1
                raise P.ProtocolError(P.E_QUOTA, f"{lim.requests_per_identity} requests of yours are already live")
            if self.tokens[identity] + cost > lim.tokens_per_identity:
                self.refused[P.E_QUOTA] += 1
                raise P.ProtocolError(
                    P.E_QUOTA, f"your live requests would cost over {lim.tokens_per_identity} tokens (this one {cost})"
                )
        self.live[identity] += 1
        self.tokens[identity] += cost

    def release(self, identity: str, cost: int) -> None:
        self.live[identity] -= 1
        self.tokens[identity] -= cost
        if self.live[identity] <= 0:
            del self.live[identity], self.tokens[identity]

    def prune(self, now: float | None = None) -> None:
        """Forget idle connections' buckets (called once a second), so their number stays bounded."""
        now = time.monotonic() if now is None else now
        self.buckets = {a: b for a, b in self.buckets.items() if now - b[1] < self.IDLE_S}
