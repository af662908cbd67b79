"""Where quantad stands against llama-server: the README's table and plot, from the latest runs.

The figures are ratios measured in one run each (quantad / llama-server, same model, same client,
same machine); their commands and dates are in benchmarks/README.md.  This module only draws
them: ``python -m benchmarks.standing`` writes ``docs/img/standing.png`` and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.results import Figure, bars

# (what, quantad / llama-server, better when) from the runs of 2026-12-06 (2-core CPU, SmolLM2-135M Q4_1)
FIGURES = [
    ("light load: p50 job time", 0.90, "lower"),
    ("light load: short requests' p99 TTFT", 0.84, "lower"),
    ("4 x 128 tokens: tokens/s", 1.06, "higher"),
    ("burst 32 x 128: tokens/s", 0.91, "higher"),
    ("overload (64 at 3/s): mean job time, srpt", 0.65, "lower"),
    ("overload: short requests' p99 TTFT", 0.06, "lower"),
    ("agents resending chats: prompt computed", 0.31, "lower"),
    ("agents: mean agent completion", 0.60, "lower"),
]
OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "standing.png"


def table() -> str:
    rows = ["| measure | quantad / llama-server | better |", "|---|---|---|"]
    rows += [f"| {what} | {ratio:.2f} | {better} |" for what, ratio, better in FIGURES]
    return "\n".join(rows)


def plot(out: Path) -> None:
    figures = [Figure(what, ratio, better) for what, ratio, better in FIGURES]
    bars(figures, "quantad / llama-server, same model, client and machine", out, "1.0: the same; green: quantad better")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    plot(args.out)
    print(table())
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
