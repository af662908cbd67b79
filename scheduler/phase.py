"""Where the daemon is in its life: starting, serving, draining; shared by whoever must know it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class Phase:
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # every worker was up once: serving
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # a signal (or a fatal error): draining
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # draining and nothing left, or a second signal
    fatal: str | None = None  # why the daemon gave up (exit status 1)

    @property
    def name(self) -> str:
        return "draining" if self.stopping.is_set() else "serving" if self.ready.is_set() else "starting"

    def fail(self, reason: str) -> None:
        self.fatal = reason
        self.stopping.set()
