"""The module benchmarks' current figures, as benchmarks/README.md lists them, and a plot of each.

Every figure is a ratio of two things measured in one run (ours against a reference: the bare
loop, memcpy, recomputing, separate requests), so a plot shows each as a bar against 1.0.  The
figures come from the runs named by date (details in benchmarks/LOG.md); this module only keeps
and draws them: ``python -m benchmarks.results`` writes ``docs/img/bench/<name>.png`` and prints
the README's table.  After a new run, change its entry here and run it again.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
MACHINE = "2-core x86 CPU, no GPU"


@dataclass(frozen=True)
class Figure:
    what: str  # ours / what, in words
    ratio: float
    better: str  # "higher" or "lower": which side of the reference is good
    reference: float = 1.0  # where "as good as the reference" lies


@dataclass(frozen=True)
class Result:
    name: str
    title: str
    command: str
    date: str
    figures: tuple[Figure, ...]
    machine: str = MACHINE


RESULTS = (
    Result("step_overhead", "one step's cost through the daemon (llama.cpp engine)",
           "python -m benchmarks.step_overhead --rounds 5", "2026-12-06",
           (Figure("1 row: tokens/s vs bare llama_decode loop", 0.974, "higher"),
            Figure("4 rows: vs bare loop", 0.903, "higher"),
            Figure("16 rows: vs bare loop", 0.992, "higher"))),
    Result("batching", "batched throughput (HF engine, 16 slots, rr 100 ms)", "python -m benchmarks.batching",
           "2026-11-26",
           (Figure("tokens/s vs a bare batched loop (fastest pass)", 0.913, "higher"),
            Figure("16 slots / 1 slot (tokens/s, target 5-10)", 6.0, "higher"))),
    Result("sessions", "sessions over 8 turns", "python -m benchmarks.sessions", "2026-11-26",
           (Figure("prompt tokens computed / prompt tokens", 0.196, "lower"),
            Figure("TTFT turn 8 / turn 1", 1.27, "lower"))),
    Result("switch_costs", "context switch cost per tier (HF engine)", "python -m benchmarks.switch_costs",
           "2026-11-26",
           (Figure("host tier: speed vs memcpy out and back", 0.82, "higher"),
            Figure("disk tier: speed vs write+fsync+read", 1.03, "higher"))),
    Result("migration", "migrating a context between workers", "python -m benchmarks.migration", "2026-11-26",
           (Figure("migrate (direct) / recompute, time", 1 / 57, "lower"),)),
    Result("core", "context switch and overhead against recomputing", "python -m benchmarks.core", "2026-11-25",
           (Figure("incremental KV vs recompute at 1024 tokens (speed-up)", 29.8, "higher"),)),
    Result("crash_soak", "the journal under SIGKILLs", "python -m benchmarks.crash_soak --model TINY", "2026-12-02",
           (Figure("requests correct across 32 SIGKILLs", 1.0, "higher"),
            Figure("journal's share of the daemon's CPU", 0.014, "lower"))),
    Result("choices", "n choices against n separate requests", "python -m benchmarks.choices", "2026-12-02",
           (Figure("prompt tokens computed", 0.250, "lower"), Figure("wall time", 0.341, "lower"))),
)  # fmt: skip


def bars(figures: list[Figure], title: str, out: Path, xlabel: str) -> None:
    """One horizontal bar per figure, green where ours is the better side of its reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.45 * len(figures) + 0.6), dpi=110)
    rows = figures[::-1]
    good = [(f.ratio >= f.reference) == (f.better == "higher") for f in rows]
    ratios = [max(f.ratio, 1e-3) for f in rows]
    log = max(ratios + [1.0]) / min(ratios + [1.0]) > 20  # figures far apart: a log axis shows them all
    ax.barh([f.what for f in rows], ratios, color=["#2e7d32" if g else "#c62828" for g in good])
    ax.axvline(1.0, color="black", linewidth=1)
    if log:
        ax.set_xscale("log")
        ax.set_xlim(min(ratios + [1.0]) / 2, max(ratios + [1.0]) * 4)
    else:
        ax.set_xlim(0, max(ratios + [1.0]) * 1.3)
    for y, r in enumerate(ratios):
        ax.text(r, y, f" {rows[y].ratio:.3g}", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def table() -> str:
    rows = ["| benchmark | command | figures (ours / reference) | date | plot |", "|---|---|---|---|---|"]
    for r in RESULTS:
        figs = "; ".join(f"{f.what} **{f.ratio:.3g}**" for f in r.figures)
        rows.append(f"| {r.title} | `{r.command}` | {figs} | {r.date} | [plot](../docs/img/bench/{r.name}.png) |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=IMG / "bench", help="folder for the PNGs")
    args = ap.parse_args(argv)
    for r in RESULTS:
        bars(list(r.figures), f"{r.title} ({r.date}, {r.machine})", args.out / f"{r.name}.png", "ratio (1.0: the same)")
    print(table())


if __name__ == "__main__":
    main()
