"""How a socket proves who it is: the credentials a worker gets from the daemon that starts it, and CURVE keys.

The daemon hands each worker it starts a secret it did not choose, as one JSON line on the
worker's stdin (never on a command line, nor in an environment other processes may read):
``{"plain": SECRET}`` (ZeroMQ's PLAIN, on ipc:// and loopback endpoints: the worker's name and
its secret) or ``{"curve": {"server": KEY, "public": KEY, "secret": KEY}}`` (Z85 keys, on an
endpoint that requires CURVE).  The daemon's ZAP handler (``scheduler.gate``) checks them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import zmq
import zmq.auth


def read_stdin() -> dict[str, Any]:
    """The credentials line the daemon wrote; ``{}`` when there is none."""
    line = sys.stdin.readline()
    try:
        creds = json.loads(line) if line.strip() else {}
    except ValueError:
        raise SystemExit("quantad worker: the credentials on stdin are not JSON") from None
    if not isinstance(creds, dict):
        raise SystemExit("quantad worker: the credentials on stdin are not a JSON object")
    return creds


def apply(sock: zmq.Socket, name: str, creds: dict[str, Any]) -> None:
    """Set a connecting socket's security options from ``creds`` (before ``connect``)."""
    if "plain" in creds:
        sock.plain_username = name.encode()
        sock.plain_password = str(creds["plain"]).encode()
    elif "curve" in creds:
        c = creds["curve"]
        curve_client(sock, c["server"].encode(), c["public"].encode(), c["secret"].encode())


def curve_client(sock: zmq.Socket, server_public: bytes, public: bytes, secret: bytes) -> None:
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret


def load_client_keys(secret_file: str | Path, server_file: str | Path) -> tuple[bytes, bytes, bytes]:
    """``(server public, own public, own secret)`` from ``quantad keygen`` files (Z85)."""
    public, secret = zmq.auth.load_certificate(secret_file)
    server, _ = zmq.auth.load_certificate(server_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key (pass the .key_secret file)")
    return server, public, secret
