"""Figures of one run, from its records: latency percentiles per class, throughput, switching, fairness."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from benchmarks.harness.driver import Record


def percentile(xs: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (``q`` in 0..100), None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(xs: Sequence[float]) -> dict[str, float | None]:
    return {
        "n": len(xs),
        "mean": sum(xs) / len(xs) if xs else None,
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
    }


def jain(xs: Iterable[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 when all equal, 1/n when one gets everything."""
    xs = list(xs)
    sq = sum(x * x for x in xs)
    if not xs or sq == 0:
        return None
    return sum(xs) ** 2 / (len(xs) * sq)


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def latency(recs: Sequence[Record]) -> dict[str, Any]:
    ok = [r for r in recs if r.ok]
    ttft = [r.first_token_s - r.submit_s for r in ok if r.first_token_s is not None]
    jct = [r.done_s - r.submit_s for r in ok]
    tpot = [(r.done_s - r.first_token_s) / (r.tokens - 1) for r in ok if r.first_token_s is not None and r.tokens > 1]
    queue = [r.stats["queue_s"] for r in ok if r.stats.get("queue_s") is not None]
    return {"requests": len(recs), "ok": len(ok), "ttft_s": summary(ttft), "tpot_s": summary(tpot),
            "jct_s": summary(jct), "queue_s": summary(queue)}  # fmt: skip


def fairness(recs: Sequence[Record]) -> dict[str, Any]:
    """Service per agent: tokens received, and tokens per second while the agent had a call outstanding.

    The rate while backlogged is the fair-share measure (a polite agent that asks less is not
    starved by getting less in total); Jain's index is taken over it.
    """
    by_agent: dict[str, list[Record]] = defaultdict(list)
    for r in recs:
        if r.ok:
            by_agent[r.agent].append(r)
    tokens = {a: sum(r.tokens for r in rs) for a, rs in by_agent.items()}
    busy = {a: union_length((r.submit_s, r.done_s) for r in rs) for a, rs in by_agent.items()}
    rate = {a: tokens[a] / busy[a] for a in by_agent if busy[a] > 0}
    return {
        "agents": len(by_agent),
        "tokens_by_agent": tokens,
        "rate_by_agent": {a: round(v, 3) for a, v in rate.items()},
        "jain_rate": jain(rate.values()) if len(rate) > 1 else None,
        "jain_tokens": jain(tokens.values()) if len(tokens) > 1 else None,
    }


def point_metrics(recs: Sequence[Record], costs: dict[str, float], workers: int = 1) -> dict[str, Any]:
    ok = [r for r in recs if r.ok]
    start = min((r.submit_s for r in recs if r.submit_s is not None), default=0.0)
    end = max((r.done_s for r in ok), default=start)
    makespan = max(end - start, 1e-9)
    tokens = sum(r.tokens for r in ok)
    switch = sum(float(r.stats.get("worker_switch_s", r.stats.get("context_switch_s", 0.0)) or 0.0) for r in ok)
    moved: dict[str, int] = defaultdict(int)
    for r in ok:
        for tier, n in (r.stats.get("context_bytes_moved") or {}).items():
            moved[tier] += int(n)
    n = max(len(recs), 1)
    return {
        "overall": latency(recs),
        "by_class": {c: latency([r for r in recs if r.cls == c]) for c in sorted({r.cls for r in recs})},
        "makespan_s": makespan,
        "throughput": {"requests_per_s": len(ok) / makespan, "tokens_per_s": tokens / makespan, "tokens": tokens},
        "preemptions": {
            "total": sum(max(r.preemptions, int(r.stats.get("preemptions", 0) or 0)) for r in ok),
            "per_request": sum(max(r.preemptions, int(r.stats.get("preemptions", 0) or 0)) for r in ok) / n,
        },
        "switch": {"seconds": switch, "share": switch / (makespan * max(workers, 1))},
        "context_bytes_moved": dict(moved),
        "fairness": fairness(recs),
        "overhead": {
            "client_cpu_s_per_request": costs.get("client_cpu_s", 0.0) / n,
            "driver_s_per_request": sum(r.driver_s for r in recs) / n,
            "max_submit_lateness_s": costs.get("max_submit_lateness_s", 0.0),
            "ping_ms": costs.get("ping_ms"),
        },
        "errors": sorted({r.error for r in recs if r.error})[:5],
    }
