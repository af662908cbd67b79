"""Four servers side by side on two workloads: quantad on llama.cpp, llama-server, quantad on HF, transformers serve.

One command, one run: for each workload the harness (``benchmarks.harness``) drives quantad with
``--backend llamacpp`` (round robin and MLFQ at a 100 ms quantum) beside llama.cpp's own
``llama-server``, then quantad's HF engine (round robin) beside ``transformers serve``, all with
the same seeded requests and 16 slots.  Workloads:

* ``burst``: 32 requests x 128 tokens, all at once (the issue's first figure);
* ``heavy-tail``: 64 requests arriving as a Poisson process at 2/s, 10% of 300-400 tokens and 90% of
  16-48 (the issue's own workload); llama-server's slots hardly queue at this load (p99 TTFT of
  its short requests ~1.1 s, its prefill of the prompt that just arrived);
* ``queueing``: the load chosen so that llama-server's 16 slots do queue: 3/s, 25% long, prompts of
  ~20 words (~70 tokens, so that prefill is not the whole machine); its short requests then wait
  up to 8 s for a slot held by long ones.

``python -m benchmarks.engines [--quick] [--out DIR]`` prints one table per workload, ratios
against llama-server's row; each server's full report is under ``DIR/<workload>/<engine>/``.
The burst's table has one more row, its prefill floor (``benchmarks.prefill_floor``): the time a
plain llama.cpp loop takes to prefill the prompt tokens quantad computed. No schedule gives the last
request its first token sooner (the p99 of 32 lies between the 31st and the 32nd first token).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmarks import prefill_floor
from benchmarks.common import table
from benchmarks.harness.config import BenchConfig
from benchmarks.harness.report import metric
from benchmarks.harness.runner import run

WORKLOADS: dict[str, dict[str, Any]] = {
    "burst": {"workload": "uniform", "uniform_tokens": (128, 128), "requests": 32, "rate": 1000.0},
    "heavy-tail": {
        "workload": "heavy-tail",
        "requests": 64,
        "rate": 2.0,
        "short_tokens": (16, 48),
        "long_tokens": (300, 400),
        "long_fraction": 0.1,
    },
    "queueing": {
        "workload": "heavy-tail",
        "requests": 64,
        "rate": 3.0,
        "short_tokens": (16, 48),
        "long_tokens": (300, 400),
        "long_fraction": 0.25,
        "prompt_words": 20,
    },
}
ENGINES: dict[str, dict[str, Any]] = {
    "llamacpp": {"policies": ["rr", "mlfq", "srpt"], "peer": ["llama-server"], "serve_args": ["--backend=llamacpp"]},
    "hf": {"policies": ["rr"], "peer": ["transformers"]},
}
COLUMNS = (
    ("mean JCT s", "overall.jct_s.mean"),
    ("p99 JCT s", "overall.jct_s.p99"),
    ("p99 TTFT s", "overall.ttft_s.p99"),
    ("p99 TTFT short s", "by_class.short.ttft_s.p99"),
    ("tok/s", "throughput.tokens_per_s"),
)


def _name(engine: str, point: dict) -> str:
    if point["target"] != "quantad":
        return point["label"].replace(" (peer)", "")
    return f"quantad {engine} {point['label']}"


def measure(out: Path, quick: bool) -> dict[str, list[tuple[str, dict]]]:
    rows: dict[str, list[tuple[str, dict]]] = {}
    for wl, shape in WORKLOADS.items():
        if quick:
            shape = shape | {"requests": shape["requests"] // 4}
        rows[wl] = []
        for engine, opts in ENGINES.items():
            cfg = BenchConfig(**shape, **opts, quanta=[100.0], slots=16, out=str(out / wl / engine))
            points = run(cfg)["points"]
            rows[wl] += [(_name(engine, p), p) for p in points]
            if wl == "burst" and engine == "llamacpp":
                rows[wl].append(("prefill floor (raw llama.cpp)", _floor_point(points)))
    return rows


def _floor_point(points: list[dict]) -> dict:
    """The burst's prefill floor as a row of its own, measured right after the run it bounds."""
    found = prefill_floor.of_report(points, slots=16)
    if found is None:
        return {"error": "no quantad point to take the prompts from"}
    return {"metrics": {"overall": {"ttft_s": {"p99": found[1]}}}}


def report(rows: dict[str, list[tuple[str, dict]]]) -> str:
    parts = []
    for wl, points in rows.items():
        ref = next((p for name, p in points if name == "llama-server" and not p.get("error")), None)
        body = []
        for name, p in points:
            if p.get("error"):
                body.append([name, *["failed"] * len(COLUMNS), "-"])
                continue
            cells = []
            for _, path in COLUMNS:
                v, r = metric(p, path), metric(ref, path) if ref else None
                cells.append("-" if v is None else f"{v:.2f}" + (f" ({v / r:.2f})" if r else ""))
            preempted = metric(p, "preemptions.total")
            body.append([name, *cells, "-" if preempted is None else str(preempted)])
        head = ["server", *[c for c, _ in COLUMNS], "preemptions"]
        parts.append(f"## {wl} (ratios: / llama-server)\n\n" + table(head, body))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.engines", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a quarter of the requests")
    ap.add_argument("--out", default="bench-results/engines", help="directory for each server's full report")
    args = ap.parse_args(argv)
    print(report(measure(Path(args.out), args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
