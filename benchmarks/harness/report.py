"""``results.json`` and ``results.md``: every point's figures, and the issue's targets as ratios."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _f(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def metric(p: dict, path: str) -> Any:
    """A point's metric by its dotted path (``overall.ttft_s.p99``); None where the point has none."""
    v: Any = p.get("metrics", {})
    for k in path.split("."):
        v = v.get(k) if isinstance(v, dict) else None
    return v


def _ratio(a: Any, b: Any) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


PEER_SUFFIXES = (("peer", "peer"), ("llama-server", "llama_server"))  # a peer point's target -> its keys' suffix


def targets(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, computed from this run (None where the run lacks the points)."""
    ok = [p for p in points if not p.get("error") and p["target"] == "quantad"]
    fifo = next((p for p in ok if p["policy"] == "fifo"), None) or next(
        (p for p in ok if p["policy"] == "rr" and p["quantum"] == "inf"), None
    )

    def best(policy: str) -> dict | None:
        cands = [p for p in ok if p["policy"] == policy and p["quantum"] != "inf" and metric(p, "overall.jct_s.mean")]
        return min(cands, key=lambda p: metric(p, "overall.jct_s.mean"), default=None)

    rr, mlfq = best("rr"), best("mlfq")
    fair = [p for p in ok if p["policy"] == "fair"]
    out: dict[str, Any] = {"fifo": fifo and fifo["label"], "best_rr": rr and rr["label"]}
    if rr and fifo:
        out["rr_mean_jct_over_fifo"] = _ratio(metric(rr, "overall.jct_s.mean"), metric(fifo, "overall.jct_s.mean"))
        out["rr_p99_ttft_short_over_fifo"] = _ratio(
            metric(rr, "by_class.short.ttft_s.p99"), metric(fifo, "by_class.short.ttft_s.p99")
        )
        out["rr_tokens_per_s_over_fifo"] = _ratio(
            metric(rr, "throughput.tokens_per_s"), metric(fifo, "throughput.tokens_per_s")
        )
    if mlfq:
        out["best_mlfq"] = mlfq["label"]
        out["mlfq_mean_jct_over_rr"] = rr and _ratio(
            metric(mlfq, "overall.jct_s.mean"), metric(rr, "overall.jct_s.mean")
        )
    if fair:
        out["fair_jain_min"] = min((metric(p, "fairness.jain_share") or 0.0) for p in fair)
        out["fair_jain_tokens_min"] = min((metric(p, "fairness.jain_share_tokens") or 0.0) for p in fair)
        out["fair_jain_rate_min"] = min((metric(p, "fairness.jain_rate") or 0.0) for p in fair)
    if fifo:
        out["fifo_jain"] = metric(fifo, "fairness.jain_share")
    if rr:
        out["rr_jain"] = metric(rr, "fairness.jain_share")
    for target, suffix in PEER_SUFFIXES:  # the best RR point against each peer of the run
        peer = next((p for p in points if p["target"] == target and not p.get("error")), None)
        if peer and rr:
            out[f"rr_mean_jct_over_{suffix}"] = _ratio(
                metric(rr, "overall.jct_s.mean"), metric(peer, "overall.jct_s.mean")
            )
            out[f"rr_tokens_per_s_over_{suffix}"] = _ratio(
                metric(rr, "throughput.tokens_per_s"), metric(peer, "throughput.tokens_per_s")
            )
            out[f"rr_p99_ttft_short_over_{suffix}"] = _ratio(
                metric(rr, "by_class.short.ttft_s.p99"), metric(peer, "by_class.short.ttft_s.p99")
            )
    return out


_CHECKS = [  # (key, goal text, passes)
    ("rr_mean_jct_over_fifo", "<= 0.333", lambda x: x <= 1 / 3),
    ("rr_p99_ttft_short_over_fifo", "<= 0.2", lambda x: x <= 0.2),
    ("rr_tokens_per_s_over_fifo", ">= 0.95", lambda x: x >= 0.95),
    ("mlfq_mean_jct_over_rr", "< 1", lambda x: x < 1),
    ("fair_jain_min", "> 0.95", lambda x: x > 0.95),
]


def _targets_md(t: dict[str, Any]) -> list[str]:
    lines = ["## Targets", "", f"FIFO point: {t.get('fifo') or '-'}; best RR quantum (by mean JCT): "
             f"{t.get('best_rr') or '-'}; best MLFQ: {t.get('best_mlfq') or '-'}.", "",
             "| ratio | this run | goal | met |", "|---|---|---|---|"]  # fmt: skip
    for key, goal, passes in _CHECKS:
        v = t.get(key)
        met = "-" if v is None else ("yes" if passes(v) else "no")
        lines.append(f"| {key} | {_f(v, 3) if v is not None else 'n/a (not in this run)'} | {goal} | {met} |")
    for key in (
        "fair_jain_tokens_min",
        "fair_jain_rate_min",
        "fifo_jain",
        "rr_jain",
        *(
            f"rr_{m}_over_{suffix}"
            for _, suffix in PEER_SUFFIXES
            for m in ("mean_jct", "tokens_per_s", "p99_ttft_short")
        ),
    ):
        if t.get(key) is not None:
            lines.append(f"| {key} | {_f(t[key], 3)} | (context) | |")
    return lines


_COLS = [
    ("point", None),
    ("ok/n", None),
    ("mean JCT s", "overall.jct_s.mean"),
    ("p50 JCT", "overall.jct_s.p50"),
    ("p99 JCT", "overall.jct_s.p99"),
    ("mean TTFT s", "overall.ttft_s.mean"),
    ("p99 TTFT short", "by_class.short.ttft_s.p99"),
    ("TPOT ms", "overall.tpot_s.mean"),
    ("queue s", "overall.queue_s.mean"),
    ("tok/s", "throughput.tokens_per_s"),
    ("req/s", "throughput.requests_per_s"),
    ("preempt", "preemptions.total"),
    ("switch s (share)", None),
    ("Jain", "fairness.jain_share"),
    ("client ms/req", "overhead.client_cpu_s_per_request"),
]


def _row(p: dict[str, Any]) -> list[str]:
    if p.get("error"):
        first = p["error"].splitlines()[0]
        return [p["label"], "0/0", f"error: {first}"] + [""] * (len(_COLS) - 3)
    out = []
    for name, path in _COLS:
        if name == "point":
            out.append(p["label"])
        elif name == "ok/n":
            out.append(f"{metric(p, 'overall.ok')}/{metric(p, 'overall.requests')}")
        elif name == "switch s (share)":
            out.append(f"{_f(metric(p, 'switch.seconds'), 3)} ({_f(100 * (metric(p, 'switch.share') or 0), 1)}%)")
        elif name == "TPOT ms":
            v = metric(p, path)
            out.append(_f(None if v is None else v * 1000, 1))
        elif name == "client ms/req":
            out.append(_f(metric(p, path) * 1000, 2))
        else:
            out.append(_f(metric(p, path), 3 if name == "Jain" else 2))
    return out


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _intro(result: dict[str, Any]) -> list[str]:
    cfg = result["config"]
    return [
        f"# quantad bench: {cfg['workload']}",
        "",
        f"{result['started']}; model `{cfg['model']}`; {cfg['requests']} requests; rate {cfg['rate']}/s "
        f"(burstiness CV {cfg['burstiness']}); slots {cfg['slots']}; seed {cfg['seed']}; min_tokens "
        f"{cfg['min_tokens']}; CPU pressure during the run {result.get('cpu_pressure') or 'n/a'}.",
        "",
        "Times in seconds from the client's side (JCT: submit to done; TTFT: submit to first token); "
        "queue: accept to first dispatch (daemon); switch: worker time saving and restoring contexts, share of "
        "the makespan; Jain: Jain's index over the agents' fair-share ratios (VTC-weighted service received "
        "over each one's share of what was served while it had calls outstanding; 1 is perfectly fair); client "
        "ms/req: the harness process's CPU time per request (its own overhead).",
    ]


def _by_class(points: list[dict[str, Any]]) -> list[str]:
    """Per point and request class: JCT, TTFT and TPOT."""
    rows = [
        [p["label"], c, str(m["ok"]), _f(m["jct_s"]["mean"]), _f(m["jct_s"]["p90"]), _f(m["jct_s"]["p99"]),
         _f(m["ttft_s"]["mean"]), _f(m["ttft_s"]["p99"]),
         _f(None if m["tpot_s"]["mean"] is None else m["tpot_s"]["mean"] * 1000, 1)]
        for p in points
        if not p.get("error")
        for c, m in p["metrics"]["by_class"].items()
    ]  # fmt: skip
    headers = ["point", "class", "n", "mean JCT", "p90 JCT", "p99 JCT", "mean TTFT", "p99 TTFT", "TPOT ms"]
    return ["## By class", "", *_table(headers, rows)]


def _bytes_moved(points: list[dict[str, Any]]) -> list[str]:
    """Per daemon point: the context bytes moved into each tier."""
    moved = [(p["label"], sorted(p["metrics"]["context_bytes_moved"].items())) for p in points
             if not p.get("error") and p["target"] == "quantad"]  # fmt: skip
    rows = [[name, ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in tiers) or "-"] for name, tiers in moved]
    return ["## Context bytes moved per tier", "", *_table(["point", "bytes by tier"], rows)]


def _overhead_md(o: dict[str, Any]) -> list[str]:
    return [
        "## Harness overhead",
        "",
        f"Client CPU per request {_f(o.get('client_cpu_ms_per_request'))} ms, driver code per "
        f"request {_f(o.get('driver_ms_per_request'), 3)} ms, daemon ping round trip "
        f"{_f(o.get('ping_ms'), 3)} ms (median), worst lateness of a planned submit "
        f"{_f(o.get('max_submit_lateness_s'), 3)} s; against a mean JCT of "
        f"{_f(o.get('mean_jct_s'))} s.",
    ]


def _agents_md(points: list[dict[str, Any]]) -> list[str]:
    """Per point, the agents' figures (``agents-chat``): turns, the short-answer agents', completion, prompt."""
    rows = [
        [p["label"], _f(a["turn_s"]["mean"]), _f(a["short_agents_turn_s"]["mean"]), _f(a["agent_completion_s"]["mean"]),
         _f(p["metrics"]["overall"]["ttft_s"]["p99"]), f"{a['prompt_tokens_computed']} of {a['prompt_tokens_sent']}",
         _f(p["metrics"]["throughput"]["tokens_per_s"], 1)]
        for p in points
        if not p.get("error") and (a := p["metrics"].get("agents"))
    ]  # fmt: skip
    if not rows:
        return []
    headers = ["point", "mean turn s", "short agents' turn s", "mean agent completion s", "p99 TTFT s",
               "prompt tokens computed", "tokens/s"]  # fmt: skip
    return ["## Agents", "", *_table(headers, rows)]


def markdown(result: dict[str, Any]) -> str:
    points = result["points"]
    sections = [
        [*_intro(result), "", *_table([c for c, _ in _COLS], [_row(p) for p in points])],
        _agents_md(points),
        _by_class(points),
        _bytes_moved(points),
        _overhead_md(result["overhead"]),
        _targets_md(result["targets"]),
    ]
    return "\n".join(line for section in sections for line in [*section, ""])


def overhead(points: list[dict[str, Any]]) -> dict[str, Any]:
    q = [p for p in points if not p.get("error") and p["target"] == "quantad"]
    if not q:
        return {}

    def mean(path: str) -> float | None:
        xs = [v for p in q if (v := metric(p, path)) is not None]
        return sum(xs) / len(xs) if xs else None

    return {
        "client_cpu_ms_per_request": (mean("overhead.client_cpu_s_per_request") or 0) * 1000,
        "driver_ms_per_request": (mean("overhead.driver_s_per_request") or 0) * 1000,
        "ping_ms": mean("overhead.ping_ms"),
        "max_submit_lateness_s": max(metric(p, "overhead.max_submit_lateness_s") or 0 for p in q),
        "mean_jct_s": mean("overall.jct_s.mean"),
    }


def write(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    js, md = out / "results.json", out / "results.md"
    js.write_text(json.dumps(result, indent=1, default=str))
    md.write_text(markdown(result))
    return js, md
