"""systemd's notify protocol (sd_notify(3)), written here so the daemon needs no extra dependency.

One datagram of ``KEY=VALUE`` lines to the unix socket named by ``$NOTIFY_SOCKET``; a name
starting with ``@`` is in the abstract namespace.  Without the variable every call is a no-op,
so the daemon runs the same in a terminal.  Sends never block: a full socket drops the line.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("quantad")

# What children must not inherit: with NotifyAccess=main their messages would be ignored anyway.
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def notify(*lines: str) -> bool:
    """Send ``lines`` as one message; True when it was delivered."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not lines:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        return False  # vsock addresses (vsock:CID:PORT) are for VMs; not supported
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.setblocking(False)
            s.connect(address)
            s.send("\n".join(lines).encode())
        return True
    except OSError as exc:
        log.debug("event=notify_failed errno=%s", exc.errno)
        return False


def watchdog_period() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None when no watchdog is armed."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def monotonic_usec() -> str:
    """``MONOTONIC_USEC=``, which systemd wants beside ``RELOADING=1``."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
