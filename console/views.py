"""Text tables of the daemon's state, shared by ``quantad ps``, ``quantad workers`` and ``quantad top``.

Pure functions from the ops' replies to lines of text, so the live view and the one-shot commands
show the same thing and tests can read either.
"""

from __future__ import annotations

import os
from typing import Any

from ipc import protocol as P

PS_COLS = tuple("pid agent state nice priority worker quanta tokens context context_bytes preemptible age_s".split())
PS_HEADS = tuple("PID AGENT STATE NI PRI WORKER QUANTA TOKENS CONTEXT BYTES PREEMPT AGE".split())
WORKER_HEADS = tuple(
    "WORKER STATE PID SLOTS DEVICE MODEL HEARTBEAT RESTARTS DEVICE_KV HOST_KV DISK_KV RECOMPUTE RSS CACHE HITS".split()
)


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns, as wide as their widest cell; agent names with control characters stay on one line."""
    rows = [tuple("".join(ch if ch.isprintable() else "?" for ch in cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def size(n: int | None) -> str:
    """Bytes for a person: 0, 812B, 4.0K, 12.5M, 3.2G."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n}B" if n else "0"
    for unit in "KMGT":
        n /= 1024
        if n < 1024 or unit == "T":
            return f"{n:.1f}{unit}"
    return str(n)


def ps_table(requests: list[dict[str, Any]]) -> list[str]:
    shown = {True: "yes", False: "no", None: "-"}  # "no": runs to the end of its turn (the API cannot resume it)
    rows = [PS_HEADS] + [
        tuple(shown[r.get(c)] if isinstance(r.get(c), bool | None) else str(r.get(c)) for c in PS_COLS)
        for r in requests
    ]
    return table(rows)


def workers_table(workers: list[dict[str, Any]]) -> list[str]:
    return table([WORKER_HEADS] + [_worker_row(w) for w in workers])


def _worker_row(w: dict[str, Any]) -> tuple[str, ...]:
    age = w.get("heartbeat_age_s")
    mem = w.get("memory") or {}
    model = os.path.basename(str(w.get("model") or "-").rstrip("/")) or "-"
    heartbeat = "-" if age is None else f"{age:.1f}s ago"
    ident = (w["name"], w["state"], str(w.get("pid") or "-"), f"{w['used']}/{w['slots']}", str(w.get("device") or "-"))
    usage = (str(w.get("restarts", 0)), *(size(mem.get(t, 0)) for t in P.TIERS), size(w.get("rss_bytes")))
    cache = w.get("cache") or {}
    kept = f"{size(cache.get('bytes') or 0)}/{cache.get('entries') or 0}"  # bytes / entries
    return (*ident, model, heartbeat, *usage, kept, str(cache.get("hits") or 0))


def _duration(s: float) -> str:
    s = int(s)
    clock = f"{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 86400}d{clock}" if s >= 86400 else f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _quantum(q: dict[str, Any]) -> str:
    parts = [f"{q['tokens']} tokens" if q.get("tokens") else "", f"{q['ms']:g} ms" if q.get("ms") else ""]
    return " / ".join(p for p in parts if p) or "none (FIFO)"


def top_screen(
    snap: dict[str, Any] | None, width: int, height: int | None = None, error: str | None = None, footer: str = ""
) -> list[str]:
    """The whole ``quantad top`` screen: a summary, the workers, then as many requests as fit."""
    if snap is None:
        lines = ["quantad top: no answer from the daemon", error or "", "", footer]
        return [line[:width] for line in lines]
    st, workers, reqs = snap["stats"], snap["workers"], snap["ps"]["requests"]
    fin = st["finished"]
    mem = {t: sum((w.get("memory") or {}).get(t, 0) for w in workers) for t in P.TIERS}
    lines = [
        f"quantad {st['phase']}  {st['endpoints']['agents']}  up {_duration(st['uptime_s'])}  policy {st['policy']}  "
        f"quantum {_quantum(st['quantum'])}  model {st['model'] or '-'}",
        f"Requests: {st['requests'].get('RUNNING', 0)} running, {st['queue']} queued; done {fin.get('DONE', 0)}, "
        f"failed {fin.get('FAILED', 0)}, cancelled {fin.get('CANCELLED', 0)}; preemptions {st['preemptions']}",
        f"Tokens: {st['tokens']} generated, {st['tokens_per_s']:.1f}/s   Workers: {st['workers']['up']}/"
        f"{st['workers']['configured']} up   Context memory: " + ", ".join(f"{t} {size(mem[t])}" for t in P.TIERS),
        "",
        *workers_table(workers),
        "",
    ]
    rows = ps_table(reqs)
    room = None if height is None else max(1, height - len(lines) - (2 if footer else 0))
    if room is not None and len(rows) > room:
        rows = rows[: room - 1] + [f"... {len(rows) - room + 1} more requests (quantad ps)"]
    lines += rows
    if footer:
        lines += ["", footer]
    return [line[:width] for line in lines]
