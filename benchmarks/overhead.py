"""Scheduler overhead: N concurrent requests through a real daemon vs the same work in a bare loop.

Why: preemption, the ZeroMQ hops and the per-token messages must cost little next to the
model itself.  The daemon side is ``quantad serve --policy rr`` started as a subprocess, with
requests submitted concurrently by ``AsyncClient`` and timed from the first submit to the last
``done`` (so every preemption and resume is inside the window).  The baseline runs the same
greedy generations one after another in this process: ``HFModel`` prefill, then decode with
argmax, batch 1, no sockets.  Both sides are warmed up first (the first forward of a process
pays seconds of one-off initialisation).  Passes alternate, bare / daemon / bare / ..., and each
daemon pass is compared with the bare passes on either side of it, so drifting background
load on a shared machine hits both; each pass also records how contended the CPU was (Linux
PSI), and the headline is the round with the least contention.  Greedy outputs must be
token-identical.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

import torch

from backends.hf_model import HFModel
from benchmarks.common import (
    Pass,
    chat_messages,
    daemon_pass,
    greedy,
    load_engine,
    log,
    median,
    psi_stall_s,
    serving,
    stall_share,
    table,
)
from ipc.client import AsyncClient


@torch.inference_mode()
def bare_generate(engine: HFModel, messages: list[dict[str, str]], max_tokens: int) -> list[int]:
    """The reference loop: what a worker does for one request, minus sockets and scheduling."""
    cache, logits = engine.prefill(engine.render(messages))
    out: list[int] = []
    while True:
        token = greedy(logits)
        out.append(token)
        if token in engine.eos_ids or len(out) >= max_tokens:
            return out
        logits = engine.decode(cache, token)


def bare_pass(engine: HFModel, n: int, max_tokens: int) -> Pass:
    t0 = time.perf_counter()
    outs = [bare_generate(engine, chat_messages(i), max_tokens) for i in range(n)]
    return Pass("bare", outs, time.perf_counter() - t0)


async def _alternate(engine: HFModel, endpoint: str, n: int, max_tokens: int, rounds: int) -> list[Pass]:
    """bare, daemon, bare, daemon, ..., bare: each daemon pass is compared with its two neighbours."""
    async with AsyncClient(endpoint, agent="bench", timeout=600.0) as client:
        await client.chat(chat_messages(0), max_tokens=4, temperature=0)  # warm the worker up
        since = psi_stall_s()
        passes = [bare_pass(engine, n, max_tokens)]
        passes[-1].pressure = stall_share(since, passes[-1].wall_s)
        for r in range(rounds):
            log(f"overhead: round {r + 1}/{rounds}: daemon pass, then bare pass")
            since = psi_stall_s()
            passes.append(await daemon_pass(client, n, max_tokens))
            passes[-1].pressure = stall_share(since, passes[-1].wall_s)
            since = psi_stall_s()
            passes.append(bare_pass(engine, n, max_tokens))
            passes[-1].pressure = stall_share(since, passes[-1].wall_s)
    return passes


@dataclass
class Outcome:
    passes: list[Pass]
    exit_code: int
    left: list[int]


def measure(engine: HFModel, model: str, n: int, max_tokens: int, quantum_ms: float, rounds: int) -> Outcome:
    """The alternating passes through ``quantad serve --policy rr``, then its exit code and leftover workers."""
    with serving({"a": ["--policy", "rr", "--quantum-ms", f"{quantum_ms:g}"]}, model, prefix="qd-bench-") as daemons:
        passes = asyncio.run(_alternate(engine, daemons["a"].endpoint, n, max_tokens, rounds))
    return Outcome(passes, daemons["a"].exit_code, daemons["a"].left)


@dataclass
class Round:
    """A daemon pass and the bare passes just before and after it."""

    before: Pass
    daemon: Pass
    after: Pass

    @property
    def ratio(self) -> float:
        return self.daemon.tps / ((self.before.tps + self.after.tps) / 2)

    @property
    def extra_s(self) -> float:
        return self.daemon.wall_s - (self.before.wall_s + self.after.wall_s) / 2

    @property
    def pressure(self) -> float:
        """The worst CPU contention seen during the round (0 where PSI is not available)."""
        return max(p.pressure or 0.0 for p in (self.before, self.daemon, self.after))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def run(engine: HFModel, model: str, n: int, max_tokens: int, quantum_ms: float, rounds: int = 3) -> str:
    out = measure(engine, model, n, max_tokens, quantum_ms, rounds)
    if out.left:
        raise RuntimeError(f"worker processes {out.left} outlived the daemon's SIGTERM (killed them)")
    passes = out.passes
    ref = passes[0].outputs
    assert all(p.outputs == ref for p in passes if p.kind == "bare"), "the bare loop is not deterministic"
    rounds_ = [Round(passes[i - 1], passes[i], passes[i + 1]) for i in range(1, len(passes) - 1, 2)]
    quiet = min(range(len(rounds_)), key=lambda k: rounds_[k].pressure)  # ties: the first

    rows = []
    for i, p in enumerate(passes):
        if p.kind == "daemon":
            label, ratio = f"quantad rr, {n} concurrent #{i // 2 + 1}", f"{rounds_[i // 2].ratio:.3f}"
        else:
            label, ratio = f"bare loop, sequential #{i // 2 + 1}", "-"
        rows.append((label, p.tokens, f"{p.wall_s:.2f}", f"{p.tps:.2f}", _pct(p.pressure), ratio))

    daemons = [r.daemon for r in rounds_]
    results = [r for p in daemons for r in p.results]
    identical = sum(p.outputs[j] == ref[j] for p in daemons for j in range(n))
    preempt = [sum(int(r.stats.get("preemptions", 0)) for r in p.results) for p in daemons]
    switch_ms = 1e3 * sum(float(r.stats.get("context_switch_s", 0.0)) for r in results)
    computed = sum(int(r.stats.get("prompt_tokens_computed", 0)) for r in results)
    prompt = sum(int(r.usage.get("prompt_tokens", 0)) for r in results)
    q = rounds_[quiet]
    facts = [
        (f"**daemon / bare tokens/s, quietest round (#{quiet + 1})**", f"**{q.ratio:.3f}**"),
        ("daemon / bare tokens/s, median over rounds", f"{median([r.ratio for r in rounds_]):.3f}"),
        ("preemptions per daemon pass", ", ".join(map(str, preempt))),
        ("extra wall time per preemption (quietest round), ms", f"{1e3 * q.extra_s / max(preempt[quiet], 1):.2f}"),
        ("worker snapshot time per preemption, ms", f"{switch_ms / max(sum(preempt), 1):.3f}"),
        ("prompt tokens computed / prompt tokens", f"{computed} / {prompt}"),
        ("greedy outputs identical to the bare loop", f"{identical} / {n * len(daemons)}"),
        ("daemon exit code after SIGTERM", out.exit_code),
        ("worker processes left after SIGTERM", len(out.left)),
    ]
    return (
        f"### Overhead ({n} requests x max {max_tokens} tokens, greedy, rr quantum {quantum_ms:g} ms)\n\n"
        + table(("pass", "tokens", "wall s", "tokens/s", "CPU pressure", "daemon / neighbouring bare"), rows)
        + "\n\n"
        + table(("summary", "value"), facts)
        + "\n\nEach daemon pass is compared with the mean tokens/s of the bare passes just before and after it.  "
        "CPU pressure: share of the pass in which some task waited for a CPU (Linux PSI; the daemon's own "
        "processes add some).  The headline is the round with the least contention.  Target: daemon / bare >= 0.95."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quantum-ms", type=float, default=100.0)
    ap.add_argument("--rounds", type=int, default=3, help="daemon passes, each between two bare passes")
    args = ap.parse_args(argv)
    engine = load_engine(args.model)
    print(run(engine, args.model, args.requests, args.max_tokens, args.quantum_ms, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
