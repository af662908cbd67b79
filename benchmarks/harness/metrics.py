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
    return sum(b - a for a, b in _union(intervals))


def latency(recs: Sequence[Record]) -> dict[str, Any]:
    ok = [r for r in recs if r.ok]
    ttft = [r.first_token_s - r.submit_s for r in ok if r.first_token_s is not None]
    jct = [r.done_s - r.submit_s for r in ok]
    tpot = [(r.done_s - r.first_token_s) / (r.tokens - 1) for r in ok if r.first_token_s is not None and r.tokens > 1]
    queue = [r.stats["queue_s"] for r in ok if r.stats.get("queue_s") is not None]
    return {"requests": len(recs), "ok": len(ok), "ttft_s": summary(ttft), "tpot_s": summary(tpot),
            "jct_s": summary(jct), "queue_s": summary(queue)}  # fmt: skip


VTC_WEIGHTS = (1.0, 2.0)  # service per prompt token and per generated token: the fair policy's defaults
SHARE_BIN_S = 0.5  # time resolution of the fair-share measure


def _service_events(r: Record, weights: tuple[float, float]) -> list[tuple[float, float]]:
    """When ``r``'s service arrived: its prompt with its first token, each generated token as it came."""
    w_in, w_out = weights
    events = []
    if r.first_token_s is not None and r.prompt_tokens:
        events.append((r.first_token_s, w_in * r.prompt_tokens))
    if r.arrivals:
        got = sum(n for _, n in r.arrivals)
        scale = r.tokens / got if got and r.tokens else 1.0  # usage is the truth; events may batch tokens
        events += [(t, w_out * n * scale) for t, n in r.arrivals]
    elif r.tokens and r.first_token_s is not None and r.done_s is not None:  # no event times: spread evenly
        span = max(r.done_s - r.first_token_s, 1e-9)
        events += [(r.first_token_s + span * (i + 0.5) / r.tokens, w_out) for i in range(r.tokens)]
    return events


def fair_share(recs: Sequence[Record], weights: tuple[float, float] = VTC_WEIGHTS,
               bin_s: float = SHARE_BIN_S) -> dict[str, float]:  # fmt: skip
    """Each agent's service received over its fair share of what was served while it was backlogged.

    Time is cut into bins; in each, the service delivered (weighted tokens, as VTC counts them) is
    what a fair scheduler would split among the agents backlogged then (a call outstanding), in
    proportion to how much of the bin each was backlogged.  An agent's ratio is what it received
    over what that split entitled it to: 1 for every agent under perfect fair sharing, below 1 for
    one that was starved while it was asking.  Unlike a rate while backlogged, this does not hold
    against a polite agent that the greedy one had the model to itself while the polite one thought.
    """
    by_agent: dict[str, list[Record]] = defaultdict(list)
    for r in recs:
        if r.ok and r.submit_s is not None:
            by_agent[r.agent].append(r)
    if len(by_agent) < 2:
        return {}
    start = min(r.submit_s for rs in by_agent.values() for r in rs)
    end = max(r.done_s for rs in by_agent.values() for r in rs)
    n_bins = max(1, math.ceil((end - start) / bin_s))
    served = {a: [0.0] * n_bins for a in by_agent}
    covered = {a: [0.0] * n_bins for a in by_agent}
    for a, rs in by_agent.items():
        for r in rs:
            for t, s in _service_events(r, weights):
                served[a][min(n_bins - 1, max(0, int((t - start) / bin_s)))] += s
        for lo, hi in _union((r.submit_s, r.done_s) for r in rs):
            for b in range(int((lo - start) / bin_s), min(n_bins, int((hi - start) / bin_s) + 1)):
                b_lo = start + b * bin_s
                covered[a][b] += max(0.0, min(hi, b_lo + bin_s) - max(lo, b_lo)) / bin_s
    received = {a: 0.0 for a in by_agent}
    entitled = {a: 0.0 for a in by_agent}
    for b in range(n_bins):
        total_cov = sum(covered[a][b] for a in by_agent)
        if total_cov <= 0:
            continue
        total = sum(served[a][b] for a in by_agent)
        for a in by_agent:
            received[a] += served[a][b]
            entitled[a] += total * covered[a][b] / total_cov
    return {a: received[a] / entitled[a] for a in by_agent if entitled[a] > 0}


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def fairness(recs: Sequence[Record]) -> dict[str, Any]:
    """Service per agent: tokens received, tokens per second while backlogged, and the fair-share ratio.

    ``jain_share`` (the fairness target) is Jain's index over ``fair_share``: service in VTC's
    weighted tokens against each agent's share of what was served while it was asking.
    ``jain_share_tokens`` is the same in generated tokens only.  ``jain_rate`` is over the
    tokens per second while backlogged, which counts it against a polite agent that a greedy one
    used the model alone while the polite one thought (kept for comparison with earlier runs).
    """
    by_agent: dict[str, list[Record]] = defaultdict(list)
    for r in recs:
        if r.ok:
            by_agent[r.agent].append(r)
    tokens = {a: sum(r.tokens for r in rs) for a, rs in by_agent.items()}
    busy = {a: union_length((r.submit_s, r.done_s) for r in rs) for a, rs in by_agent.items()}
    rate = {a: tokens[a] / busy[a] for a in by_agent if busy[a] > 0}
    share, share_tokens = fair_share(recs), fair_share(recs, (0.0, 1.0))
    return {
        "agents": len(by_agent),
        "tokens_by_agent": tokens,
        "rate_by_agent": {a: round(v, 3) for a, v in rate.items()},
        "share_by_agent": {a: round(v, 3) for a, v in share.items()},
        "share_tokens_by_agent": {a: round(v, 3) for a, v in share_tokens.items()},
        "jain_share": jain(share.values()) if len(share) > 1 else None,
        "jain_share_tokens": jain(share_tokens.values()) if len(share_tokens) > 1 else None,
        "jain_rate": jain(rate.values()) if len(rate) > 1 else None,
        "jain_tokens": jain(tokens.values()) if len(tokens) > 1 else None,
    }


def agent_turns(recs: Sequence[Record]) -> dict[str, Any]:
    """Agents resending their conversations: turn latency (all, and of the agents with only short answers),
    each agent's completion time (its first submit to its last answer), and prompt tokens computed of sent."""
    by_agent: dict[str, list[Record]] = defaultdict(list)
    for r in recs:
        by_agent[r.agent].append(r)
    ok = [r for r in recs if r.ok]
    short = [r for rs in by_agent.values() if all(x.cls == "short" for x in rs) for r in rs if r.ok]
    spans = [max(r.done_s for r in rs) - min(r.submit_s for r in rs) for rs in by_agent.values()
             if all(r.ok for r in rs)]  # fmt: skip
    computed = [r.prompt_computed for r in ok]
    return {
        "turn_s": summary([r.done_s - r.submit_s for r in ok]),
        "short_agents_turn_s": summary([r.done_s - r.submit_s for r in short]),
        "agent_completion_s": summary(spans),
        "prompt_tokens_sent": sum(r.prompt_tokens or 0 for r in ok),
        "prompt_tokens_computed": None if None in computed else sum(computed),
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
        "agents": agent_turns(recs) if any(r.turn for r in recs) else None,
        "overhead": {
            "client_cpu_s_per_request": costs.get("client_cpu_s", 0.0) / n,
            "driver_s_per_request": sum(r.driver_s for r in recs) / n,
            "max_submit_lateness_s": costs.get("max_submit_lateness_s", 0.0),
            "ping_ms": costs.get("ping_ms"),
        },
        "errors": sorted({r.error for r in recs if r.error})[:5],
    }
