"""Run every benchmark and print its Markdown table: ``python -m benchmarks.core [--quick]``.

The model is loaded (and warmed up) once and shared by the in-process benchmarks; the
overhead benchmark also starts its own ``quantad serve``, whose worker loads the model again.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import context_switch, overhead, vs_recompute
from benchmarks.common import (
    add_wait_quiet,
    like_a_worker,
    load_engine,
    parse_ints,
    print_footer,
    print_header,
    print_part,
)

NAMES = ("context_switch", "overhead", "vs_recompute")

# --quick: the same measurements, small enough to finish well under a minute.
QUICK = {
    "sizes": [128, 512],
    "repeats": 5,
    "requests": 2,
    "max_tokens": 16,
    "rounds": 1,
    "context": 256,
    "new_tokens": 4,
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.core", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (well under a minute); explicit flags win")
    ap.add_argument("--only", action="append", choices=NAMES, help="run only this benchmark (repeatable)")
    ap.add_argument("--model", default="smollm2", help="model for every benchmark (default: embedded SmolLM2-135M)")
    add_wait_quiet(ap, "benchmark")
    g = ap.add_argument_group("context switch")
    g.add_argument("--sizes", type=parse_ints, help="context lengths in tokens (default 128,512,1024)")
    g.add_argument("--repeats", type=int, help="switches per size and tier (default 15)")
    g = ap.add_argument_group("overhead")
    g.add_argument("--requests", type=int, help="concurrent requests (default 4)")
    g.add_argument("--max-tokens", type=int, help="max_tokens per request (default 64)")
    g.add_argument("--quantum-ms", type=float, default=100.0, help="daemon's round-robin quantum (default 100)")
    g.add_argument("--rounds", type=int, help="daemon passes, each between two bare passes (default 3)")
    g = ap.add_argument_group("vs recompute")
    g.add_argument("--context", type=int, help="prompt tokens (default 1024)")
    g.add_argument("--new-tokens", type=int, help="tokens generated each way (default 16)")
    return ap


def settings(args: argparse.Namespace) -> dict:
    """Explicit flags, else the --quick sizes, else the defaults."""
    defaults = {
        "sizes": [128, 512, 1024],
        "repeats": 15,
        "requests": 4,
        "max_tokens": 64,
        "rounds": 3,
        "context": 1024,
        "new_tokens": 16,
    }
    base = QUICK if args.quick else defaults
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}


def main(argv: list[str] | None = None) -> int:
    like_a_worker("benchmarks.core")
    args = build_parser().parse_args(argv)
    s = settings(args)
    chosen = args.only or list(NAMES)
    t0 = time.perf_counter()
    print_header(f"quantad benchmarks ({'quick' if args.quick else 'default'} sizes)", "benchmarks.core", argv)
    engine = load_engine(args.model)
    if "context_switch" in chosen:
        print_part(lambda: context_switch.run(engine, s["sizes"], s["repeats"]), args.wait_quiet)
    if "overhead" in chosen:
        overhead_args = (engine, args.model, s["requests"], s["max_tokens"], args.quantum_ms, s["rounds"])
        print_part(lambda: overhead.run(*overhead_args), args.wait_quiet)
    if "vs_recompute" in chosen:
        print_part(lambda: vs_recompute.run(engine, s["context"], s["new_tokens"]), args.wait_quiet)
    print_footer(t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
