"""PNG plots of a sweep (matplotlib, Agg: no display needed).

Quanta go on a categorical x axis in sweep order, ``inf`` last; a policy with one point
(``fifo``, the peer) is drawn as a horizontal line across it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.harness.report import metric


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _order(q: str) -> float:
    try:
        return float(q)  # "inf" sorts last
    except ValueError:
        return -1.0


def _series(points: list[dict[str, Any]]) -> tuple[list[str], dict[str, list[dict]], list[dict]]:
    """Quantum labels in order, the swept policies' points, and the single-point rows (fifo, peer)."""
    ok = [p for p in points if not p.get("error")]
    labels: list[str] = []
    for p in ok:
        if p["target"] == "quantad" and p["policy"] != "fifo" and p["quantum"] not in labels:
            labels.append(p["quantum"])
    labels.sort(key=_order)
    swept: dict[str, list[dict]] = {}
    flat = []
    for p in ok:
        if p["target"] == "quantad" and p["policy"] != "fifo":
            swept.setdefault(p["policy"], []).append(p)
        else:
            flat.append(p)
    return labels, swept, flat


def _vs_quantum(ax, points: list[dict], path: str, title: str, ylabel: str) -> None:
    labels, swept, flat = _series(points)
    xs = list(range(len(labels)))
    for policy, ps in swept.items():
        by_q = {p["quantum"]: metric(p, path) for p in ps}
        ys = [by_q.get(q) for q in labels]
        ax.plot([x for x, y in zip(xs, ys, strict=True) if y is not None], [y for y in ys if y is not None],
                marker="o", label=policy)  # fmt: skip
    for p in flat:
        y = metric(p, path)
        if y is not None:
            ax.axhline(y, linestyle="--" if p["target"] == "quantad" else ":", color="gray" if p["target"] ==
                       "quantad" else "black", label=p["label"])  # fmt: skip
    ax.set_xticks(xs, labels or [])
    ax.set_xlabel("quantum (ms)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _cdf(ax, points: list[dict], key: str, title: str) -> None:
    for p in points:
        if p.get("error"):
            continue
        xs = sorted(
            (r["done_s"] if key == "jct" else r["first_token_s"]) - r["submit_s"]
            for r in p["records"]
            if r["error"] is None and r["done_s"] is not None and (key == "jct" or r["first_token_s"] is not None)
        )
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=p["label"])
    ax.set_xscale("log")
    ax.set_xlabel("seconds")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def write_plots(points: list[dict[str, Any]], out: Path) -> list[Path]:
    plt = _plt()
    files = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    labels, swept, flat = _series(points)
    groups = list(swept.items()) or [("all", [])]
    for key, title in (("jct", "job completion time"), ("ttft", "time to first token")):
        fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
        for ax, (policy, ps) in zip(axes[0], groups, strict=True):
            _cdf(ax, ps + flat, key, f"{title} CDF: {policy} by quantum")
        save(fig, f"cdf_{key}.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _vs_quantum(axes[0], points, "overall.jct_s.mean", "mean JCT vs quantum", "seconds")
    _vs_quantum(axes[1], points, "overall.jct_s.p99", "p99 JCT vs quantum", "seconds")
    save(fig, "jct_vs_quantum.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _vs_quantum(axes[0], points, "throughput.tokens_per_s", "token throughput vs quantum", "tokens/s")
    _vs_quantum(axes[1], points, "throughput.requests_per_s", "request throughput vs quantum", "requests/s")
    save(fig, "throughput_vs_quantum.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _vs_quantum(axes[0], points, "preemptions.total", "preemptions vs quantum", "preemptions")
    _vs_quantum(axes[1], points, "switch.share", "context-switch time share vs quantum", "share of worker time")
    save(fig, "switching_vs_quantum.png")
    return files
