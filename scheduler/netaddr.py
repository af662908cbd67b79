"""``HOST:PORT`` for the HTTP listeners: parsed once (as an argparse type) and checked for loopback.

Kept free of aiohttp so ``quantad config check`` validates ``http`` without importing a server.
"""

from __future__ import annotations

import argparse
import ipaddress

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def split(text: str) -> tuple[str, int]:
    """``127.0.0.1:8080``, ``localhost:8080``, ``[::1]:8080`` -> (host, port); port 0 picks a free one."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:8000), got {text!r}")
    if ":" in host and not _is_ip(host):
        raise ValueError(f"bad host in {text!r} (IPv6 addresses go in brackets: [::1]:8000)")
    return host, int(port)


def host_port(text: str) -> str:
    """argparse type: validate ``HOST:PORT`` and keep it as text (what ``config show`` prints)."""
    try:
        host, port = split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach; a wildcard (0.0.0.0, ::) is not."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public address


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
