"""``quantad bench`` flags (parsed in ``console.cli``) -> a ``BenchConfig``."""

from __future__ import annotations

import argparse

from benchmarks.harness.config import BenchConfig, parse_peers, parse_quanta, parse_range


def bench_config(args: argparse.Namespace) -> BenchConfig:
    """Raises ValueError with a message for the user on a bad value."""
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies:
        raise ValueError("--policies names no policy")
    if args.min_tokens != "max" and not (args.min_tokens.isdigit()):
        raise ValueError(f"--min-tokens must be 'max' or a number of tokens, not {args.min_tokens!r}")
    if not 0.0 <= args.long_fraction <= 1.0:
        raise ValueError("--long-fraction must lie in [0, 1]")
    return BenchConfig(
        workload=args.workload,
        policies=policies,
        quanta=parse_quanta(args.quanta),
        requests=args.requests,
        rate=args.rate,
        burstiness=args.burstiness,
        seed=args.seed,
        model=args.model,
        out=args.out,
        endpoint=args.endpoint,
        slots=args.slots,
        workers=args.workers,
        peer=parse_peers(args.peer),
        min_tokens=args.min_tokens,
        short_tokens=parse_range(args.short_tokens),
        long_tokens=parse_range(args.long_tokens),
        long_fraction=args.long_fraction,
        uniform_tokens=parse_range(args.uniform_tokens),
        long_threshold=args.long_threshold,
        prompt_words=args.prompt_words,
        agents=args.agents,
        greedy_agents=args.greedy_agents,
        greedy_parallel=args.greedy_parallel,
        think_s=max(args.think_s, 0.0),
        tool_s=max(args.tool_s, 0.0),
        preamble_words=args.preamble_words,
        temperature=args.temperature,
        warmup=max(args.warmup, 0),
        timeout_s=args.timeout_s,
        serve_args=list(args.serve_arg),
        progress=not args.no_progress,
    )
