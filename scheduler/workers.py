"""Worker child processes, started by command line so the daemon never imports a model."""

from __future__ import annotations

import asyncio
import logging
import os

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
    def __init__(self, name: str, command: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.command = command
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0

    def start(self) -> None:
        asyncio.get_running_loop().create_task(self._spawn())

    async def _spawn(self) -> None:
        # stdout/stderr are inherited: worker logs go where the daemon's go (journald).
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.DEVNULL, env=worker_env(self.env)
        )
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
