"""One daemon per state directory: an exclusive lock on ``STATE_DIR/daemon.pid``, held for the daemon's life.

Two daemons on one state directory would share its snapshot files (and, later, its journal).
``flock`` is released by the kernel when the holder dies however it dies, so a SIGKILLed
daemon leaves no stale lock, and the file names the holder's pid for the error message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StateDirBusy(RuntimeError):
    pass


def hold(state_dir: Path) -> int:
    """Take the lock (the returned descriptor must stay open), or ``StateDirBusy`` naming the holder."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / "daemon.pid"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateDirBusy(
            f"another daemon (pid {holder}) runs on the state directory {state_dir}; stop it, or give this one "
            "its own (--state-dir or $QUANTAD_STATE_DIR)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
