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
    from scheduler.daemon import Daemon


def phase(d: Daemon) -> str:
    return "draining" if d.stopping.is_set() else "serving" if d.ready.is_set() else "starting"


def status_line(d: Daemon, phase_name: str | None = None) -> str:
    """systemd's ``STATUS=`` line: what runs, what waits, how many workers are up."""
    live = [r for r in d.sched.table.values() if not r.finished]
    running = sum(r.state is State.RUNNING for r in live)
    alive = sum(w.alive for w in d.sched.workers.values())
    return (
        f"STATUS={phase_name or phase(d)}: {running} running, {len(live) - running} queued, "
        f"workers {alive}/{len(d.sched.workers)} up"
    )


def quantum(d: Daemon) -> dict[str, Any]:
    q = d.sched.policy.quantum
    return {"tokens": q.tokens, "ms": q.ms}


def ps_view(d: Daemon, visible: Callable[[Request], bool] = lambda r: True) -> dict[str, Any]:
    """The ``ps`` reply: every live request the caller may see, with the policy's view of it, and the workers."""
    policy = d.sched.policy
    rows = [r.row() | policy.info(r) for r in d.sched.table.values() if not r.finished and visible(r)]
    workers = [
        {"name": w.name, "alive": w.alive, "slots": w.slots, "running": sorted(w.running), **w.info()}
        for w in d.sched.workers.values()
    ]
    return {"requests": rows, "workers": workers, "policy": policy.name, "quantum": quantum(d)}


def stats_view(d: Daemon) -> dict[str, Any]:
    """The ``stats`` reply: daemon-wide counts (also what the metrics and ``quantad top`` read)."""
    live = [r for r in d.sched.table.values() if not r.finished]
    by_state = {State.READY.value: 0, State.RUNNING.value: 0}
    for r in live:
        by_state[r.state.value] = by_state.get(r.state.value, 0) + 1
    workers = d.sched.workers.values()
    return {
        "phase": phase(d),
        "uptime_s": round(time.monotonic() - d.counters.started_at, 3),
        "started_at": round(d.counters.started_wall, 3),
        "policy": d.sched.policy.name,
        "quantum": quantum(d),
        "model": d.cfg.model_name,
        "max_context": d.sizer.limit,
        "backend": d.cfg.spec.backend,
        "queue": len(d.sched.ready),
        "requests": by_state,
        **d.counters.as_dict(),
        "refused": dict(d.admission.refused) | {"connections": d.gate.denied},
        "tokens_per_s": round(d.counters.tokens_per_s(), 3),
        "workers": {"configured": len(d.sched.workers), "up": sum(w.alive for w in workers)},
        "endpoints": {"agents": d.cfg.endpoint, **d.urls},
        "journal": None if d.journal is None else d.journal.view(),
    }


def workers_view(d: Daemon) -> list[dict[str, Any]]:
    """One row per worker for the ``workers`` reply, from its ``ready`` and its last heartbeat."""
    now = time.monotonic()
    rows = []
    for w in d.sched.workers.values():
        caps, load = w.caps, w.load
        rows.append(
            {
                "name": w.name,
                "state": w.state,
                "alive": w.alive,
                "pid": None if caps is None else caps.pid,
                "device": None if caps is None else caps.device,
                "model": None if caps is None else caps.model,
                "backend": d.cfg.spec.backend,
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
