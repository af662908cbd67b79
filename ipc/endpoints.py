"""Where the daemon listens: ``--endpoint``, else ``$QUANTAD_ENDPOINT``, else the runtime dir."""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_SOCKET = Path("/run/quantad/agents.sock")  # the systemd service's (RuntimeDirectory=quantad)


def runtime_dir() -> Path:
    """``$QUANTAD_RUNTIME_DIR``, else systemd's ``$RUNTIME_DIRECTORY``, else ``$XDG_RUNTIME_DIR/quantad``."""
    for var in ("QUANTAD_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "quantad"
    return Path(f"/tmp/quantad-{os.getuid()}")


def state_dir() -> Path:
    """Where workers keep disk snapshots (systemd's StateDirectory sets $STATE_DIRECTORY)."""
    for var in ("QUANTAD_STATE_DIR", "STATE_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "quantad"


def agent_endpoint(explicit: str | None = None, client: bool = True) -> str:
    """Clients with no daemon of their own reach the system service's socket when it exists."""
    if explicit or os.environ.get("QUANTAD_ENDPOINT"):
        return explicit or os.environ["QUANTAD_ENDPOINT"]
    mine = runtime_dir() / "agents.sock"
    if client and not mine.exists() and SYSTEM_SOCKET.exists() and not os.environ.get("QUANTAD_RUNTIME_DIR"):
        return f"ipc://{SYSTEM_SOCKET}"
    return f"ipc://{mine}"


def worker_endpoint(agent: str) -> str:
    """Workers get a sibling of the agent endpoint: ``x.sock`` -> ``x.workers.sock``, port+1 for tcp."""
    if agent.startswith("ipc://"):
        path = agent[len("ipc://") :]
        stem = path[:-5] if path.endswith(".sock") else path
        return f"ipc://{stem}.workers.sock"
    if agent.startswith("tcp://"):
        host, _, port = agent[len("tcp://") :].rpartition(":")
        if port.isdigit():
            return f"tcp://{host}:{int(port) + 1}"
    raise ValueError(f"cannot derive a worker endpoint from {agent!r}; pass --worker-endpoint")
