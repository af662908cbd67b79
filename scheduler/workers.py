"""The daemon's workers: one record per worker, and the child process behind it.

A ``Worker`` holds all the daemon knows of one worker: its process, its slots and the
requests running there, its liveness (last seen, up, given up on, restarts), its
capabilities (from its ``ready``), its last heartbeat's figures, and the sessions whose
context it keeps.  Workers are started by command line, so the daemon never imports a model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ipc import messages as M
from scheduler.sd_notify import NOTIFY_VARS

log = logging.getLogger("quantad")


# glibc returns large freed blocks to the kernel at once; every host-tier swap then page-faults
# on a fresh 20-50 MiB buffer and runs at a third of memcpy speed (measured). Keeping freed
# memory in the process lets the next swap reuse it. An operator's own setting wins.
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": "2000000000", "MALLOC_MMAP_THRESHOLD_": "1000000000"}


# Progress bars redraw one line with carriage returns: in a daemon's log (journald) they are noise.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment, less systemd's notify variables (only the daemon talks to systemd)."""
    env = {**MALLOC_ENV, **QUIET_ENV, **os.environ, **(extra or {})}
    for var in NOTIFY_VARS:
        env.pop(var, None)
    return env


class WorkerProcess:
    def __init__(
        self, name: str, command: list[str], env: dict[str, str] | None = None,
        credentials: Callable[[], dict] | None = None,
    ):  # fmt: skip
        self.name = name
        self.command = command
        self.env = env
        self.credentials = credentials  # fresh ones at every start, written to the worker's stdin
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0

    def start(self) -> None:
        asyncio.get_running_loop().create_task(self._spawn())

    async def _spawn(self) -> None:
        # stdout/stderr are inherited: worker logs go where the daemon's go (journald).
        creds = self.credentials() if self.credentials else None
        stdin = asyncio.subprocess.PIPE if creds is not None else asyncio.subprocess.DEVNULL
        self.proc = await asyncio.create_subprocess_exec(*self.command, stdin=stdin, env=worker_env(self.env))
        if creds is not None:  # a pipe only it reads: not its command line, nor an environment others can see
            try:
                self.proc.stdin.write(json.dumps(creds).encode() + b"\n")
                await self.proc.stdin.drain()
                self.proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):  # it died at once: the supervisor sees the exit
                pass
        log.info("event=worker_started worker=%s os_pid=%s", self.name, self.proc.pid)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def restart(self) -> None:
        self.restarts += 1
        await asyncio.sleep(min(0.5 * 2**self.restarts, 10.0))
        log.info("event=worker_restart worker=%s attempt=%s", self.name, self.restarts)
        await self._spawn()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def stop(self, grace_s: float) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(self.proc.wait(), grace_s)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@dataclass(eq=False)
class Worker:
    """One worker as the daemon sees it."""

    name: str
    slots: int = 1
    alive: bool = False  # its ``ready`` came and it was not lost since
    running: set[int] = field(default_factory=set)  # pids of the requests it runs now
    proc: WorkerProcess | None = None  # None: nothing to supervise (a simulated worker)
    dead: bool = False  # given up on: it died more often than --max-restarts allows
    last_seen: float | None = None  # monotonic time of its last message (None: none since start or loss)
    caps: M.Ready | None = None  # what its last ``ready`` said it runs and can do
    beat: M.Heartbeat | None = None  # its last heartbeat since that ``ready``
    sessions: set[str] = field(default_factory=set)  # session ids whose context it keeps

    @property
    def free(self) -> int:
        return self.slots - len(self.running) if self.alive else 0

    @property
    def restarts(self) -> int:
        return 0 if self.proc is None else self.proc.restarts

    @property
    def state(self) -> str:
        return "up" if self.alive else "dead" if self.dead else "starting"

    @property
    def preemptible(self) -> bool:
        """False: it cannot resume a request, which then runs to the end of its turn."""
        return True if self.caps is None else self.caps.preemptible

    @property
    def peer(self) -> str | None:
        """Its inbox for contexts that other workers push to it (migration in one hop)."""
        return None if self.caps is None else self.caps.peer

    @property
    def load(self) -> M.Load:
        return (self.beat or M.Heartbeat()).load()

    def seen(self) -> None:
        self.last_seen = time.monotonic()

    def silent_for(self, now: float) -> float:
        return 0.0 if self.last_seen is None else now - self.last_seen

    def up(self, ready: M.Ready) -> None:
        self.alive, self.slots, self.caps, self.beat = True, ready.slots, ready, None

    def lost(self) -> None:
        """Dead or restarted: nothing runs there any more, and the contexts it kept are gone."""
        self.alive, self.last_seen = False, None
        self.running.clear()
        self.sessions.clear()

    def info(self) -> dict:
        """Its ``ready`` (and last heartbeat) as ``ps`` shows them."""
        c, out = self.caps, {}
        if c is not None:
            out = {"device": c.device, "pid": c.pid, "model": c.model, "preemptible": c.preemptible, "peer": c.peer}
        return out | ({"stats": self.beat.stats} if self.beat is not None else {})
