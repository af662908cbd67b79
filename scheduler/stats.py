"""The daemon's views: what ``ps``, ``stats`` and ``workers`` answer, and systemd's status line.

The Prometheus metrics (``scheduler.metrics``) and ``quantad top`` read the same views, so
they never drift apart.  Every view is read from the daemon on its own loop, with no lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ipc import protocol as P
from scheduler.request import Request, State

if TYPE_CHECKING:
    from scheduler.core import Scheduler
    from scheduler.daemon_config import DaemonConfig
    from scheduler.gate import Gate
    from scheduler.lifecycle import Lifecycle
    from scheduler.phase import Phase
    from scheduler.prompt_size import PromptSizer


class Views:
    """Read-only: the scheduler, the lifecycle's counters and journal, the daemon's settings and phase."""

    def __init__(
        self,
        sched: Scheduler,
        life: Lifecycle,
        cfg: DaemonConfig,
        sizer: PromptSizer,
        gate: Gate,
        urls: dict[str, str | None],
        phase: Phase,
    ):
        self.sched, self.life, self.cfg, self.sizer, self.gate, self.urls, self.phase = (
            sched, life, cfg, sizer, gate, urls, phase
        )  # fmt: skip

    def status_line(self, phase_name: str | None = None) -> str:
        """systemd's ``STATUS=`` line: what runs, what waits, how many workers are up."""
        live = self.sched.live()
        running = sum(r.state is State.RUNNING for r in live)
        alive = sum(w.alive for w in self.sched.workers.values())
        return (
            f"STATUS={phase_name or self.phase.name}: {running} running, {len(live) - running} queued, "
            f"workers {alive}/{len(self.sched.workers)} up"
        )

    def quantum(self) -> dict[str, Any]:
        q = self.sched.policy.quantum
        return {"tokens": q.tokens, "ms": q.ms}

    def ps(self, visible: Callable[[Request], bool] = lambda r: True) -> dict[str, Any]:
        """The ``ps`` reply: every live request the caller may see, with the policy's view of it, and the workers."""
        policy = self.sched.policy
        rows = [r.row() | policy.info(r) for r in self.sched.live() if visible(r)]
        workers = [
            {"name": w.name, "alive": w.alive, "slots": w.slots, "running": sorted(w.running), **w.info()}
            for w in self.sched.workers.values()
        ]
        return {"requests": rows, "workers": workers, "policy": policy.name, "quantum": self.quantum()}

    def stats(self) -> dict[str, Any]:
        """The ``stats`` reply: daemon-wide counts (also what the metrics and ``quantad top`` read)."""
        live = self.sched.live()
        by_state = {State.READY.value: 0, State.RUNNING.value: 0}
        for r in live:
            by_state[r.state.value] = by_state.get(r.state.value, 0) + 1
        workers = self.sched.workers.values()
        return {
            "phase": self.phase.name,
            "uptime_s": round(time.monotonic() - self.life.counters.started_at, 3),
            "started_at": round(self.life.counters.started_wall, 3),
            "policy": self.sched.policy.name,
            "quantum": self.quantum(),
            "model": self.cfg.model_name,
            "max_context": self.sizer.known_limit,
            "backend": self.cfg.spec.backend,
            "queue": len(self.sched.ready),
            "requests": by_state,
            **self.life.counters.as_dict(),
            "refused": dict(self.life.admission.refused) | {"connections": self.gate.denied},
            "tokens_per_s": round(self.life.counters.tokens_per_s(), 3),
            "workers": {"configured": len(self.sched.workers), "up": sum(w.alive for w in workers)},
            "endpoints": {"agents": self.cfg.endpoint, **self.urls},
            "journal": self.life.journal.view(),
            "responses": self.life.responses.view(),
        }

    def workers(self) -> list[dict[str, Any]]:
        """One row per worker for the ``workers`` reply, from its ``ready`` and its last heartbeat."""
        now = time.monotonic()
        rows = []
        for w in self.sched.workers.values():
            caps, load = w.caps, w.load
            rows.append(
                {
                    "name": w.name,
                    "state": w.state,
                    "alive": w.alive,
                    "pid": None if caps is None else caps.pid,
                    "device": None if caps is None else caps.device,
                    "model": None if caps is None else caps.model,
                    "backend": self.cfg.spec.backend,
                    "slots": w.slots,
                    "used": len(w.running),
                    "running": sorted(w.running),
                    "heartbeat_age_s": None if w.last_seen is None else round(now - w.last_seen, 3),
                    "restarts": w.restarts,
                    "memory": {t: load.memory[t] for t in P.TIERS},
                    "contexts": {t: load.contexts[t] for t in P.TIERS},
                    "rss_bytes": load.rss_bytes,
                    "host_available_bytes": load.host_available_bytes,
                    "prefill_tokens": load.prefill_tokens,
                    "decode_tokens": load.decode_tokens,
                    "prefill_steps": load.prefill_steps,
                    "cache": load.cache,
                }
            )
        return rows
