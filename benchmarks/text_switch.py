"""The cost of a text-based context switch (API worker) next to a logits-based one (HF worker).

Why: an API request cannot be suspended on the server, so each resume re-sends the chat and
the partial answer, and the server prefills all of it again; the HF worker restores its KV
cache and recomputes nothing.  Same model (SmolLM2-135M-Instruct) both ways: the API side is
``transformers serve`` on loopback, resumed through ``/v1/completions`` with the chat template
rendered locally.  Each backend runs the same N concurrent greedy requests twice through a real
daemon with one slot: FIFO (no switch) and round robin with a quantum of Q tokens.  Extra seconds
per switch = (RR wall - FIFO wall) / switches; extra prompt tokens per resume come from the
workers' own counts.  Passes alternate FIFO/RR per round so drifting load hits both.

``python -m benchmarks.text_switch [--requests 4 --max-tokens 32 --quantum-tokens 4 --rounds 1]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import chat_messages, log, psi_stall_s, serving, stall_share, table, wait_for_quiet
from benchmarks.harness.servers import HttpServer, free_port
from ipc.client import AsyncClient, ChatResult


def start_server(model_dir: Path, log_path: Path, timeout_s: float = 300.0) -> HttpServer:
    """``transformers serve`` on a free loopback port, ready once it listens and lists its model."""
    port = free_port()
    exe = Path(sys.executable).parent / "transformers"
    cmd = [str(exe) if exe.exists() else "transformers", "serve", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu"]  # fmt: skip
    return HttpServer("transformers serve", cmd, port, log_path, timeout_s)


@dataclass
class Pass:
    wall_s: float
    results: list[ChatResult]
    pressure: float | None

    def total(self, key: str) -> float:
        return sum(r.stats.get(key) or 0 for r in self.results)


async def one_pass(endpoint: str, n: int, max_tokens: int) -> Pass:
    async with AsyncClient(endpoint, agent="bench", timeout=1200.0) as c:
        await c.chat("Hi", max_tokens=2, temperature=0)  # warm-up, outside the timing
        since, t0 = psi_stall_s(), time.perf_counter()
        msgs = [chat_messages(i) for i in range(n)]
        results = await asyncio.gather(*(c.chat(m, max_tokens=max_tokens, temperature=0) for m in msgs))
        wall = time.perf_counter() - t0
    return Pass(wall, list(results), stall_share(since, wall))


def measure(backend_args: list[str], a: argparse.Namespace) -> tuple[list[Pass], list[Pass]]:
    """Alternating FIFO and RR daemons on one backend: (fifo passes, rr passes)."""
    fifo, rr = [], []
    for r in range(a.rounds):
        for policy, out in (("fifo", fifo), ("rr", rr)):
            log(f"{backend_args[1]}: round {r + 1}/{a.rounds}, {policy}")
            flags = ["--policy", policy, "--quantum-tokens", str(a.quantum_tokens), "--slots", "1"]
            with serving({"agents": [*backend_args, *flags]}, prefix="qd-ts-") as daemons:
                out.append(asyncio.run(one_pass(daemons["agents"].endpoint, a.requests, a.max_tokens)))
    return fifo, rr


def row(name: str, fifo: list[Pass], rr: list[Pass]) -> list[str]:
    switches = statistics.median(p.total("preemptions") for p in rr)
    extra_s = statistics.median(r.wall_s - f.wall_s for f, r in zip(fifo, rr, strict=True))
    if name.startswith("API"):
        extra_tokens = statistics.median(p.total("extra_prompt_tokens") for p in rr)
    else:  # HF: prompt tokens computed beyond each prompt (0 when restores recompute nothing)
        extra_tokens = statistics.median(
            sum(x.stats["prompt_tokens_computed"] - x.usage["prompt_tokens"] for x in p.results) for p in rr
        )
    same = all([x.text for x in f.results] == [x.text for x in r.results] for f, r in zip(fifo, rr, strict=True))
    per = switches or 1
    per_token = statistics.median(p.wall_s / max(sum(x.usage["completion_tokens"] for x in p.results), 1) for p in fifo)
    resume_wait = statistics.median(p.total("resume_wait_s") for p in rr) / per if name.startswith("API") else None
    pressure = max((p.pressure or 0.0) for p in fifo + rr)
    return [
        name,
        f"{statistics.median(p.wall_s for p in fifo):.2f}",
        f"{statistics.median(p.wall_s for p in rr):.2f}",
        f"{switches:.0f}",
        f"{extra_tokens / per:.1f}",
        f"{extra_s / per * 1000:.0f}",
        f"{statistics.median(p.total('context_switch_s') for p in rr) / per * 1000:.2f}",
        "-" if resume_wait is None else f"{resume_wait * 1000:.0f}",
        f"{per_token * 1000:.0f}",
        f"{extra_s / per / per_token:.1f}",
        "yes" if same else "NO",
        f"{pressure:.0%}",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.text_switch", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4, help="concurrent requests")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--quantum-tokens", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1, help="FIFO/RR pairs per backend (medians)")
    ap.add_argument("--quiet-wait-s", type=float, default=600, help="wait this long at most for an idle CPU first")
    a = ap.parse_args(argv)
    from backends.model_store import resolve

    model_dir = resolve("smollm2")
    wait_for_quiet(a.quiet_wait_s)
    with tempfile.TemporaryDirectory(prefix="qd-ts-server-") as tmp:
        server = start_server(model_dir, Path(tmp) / "server.log")
        try:
            api = ["--backend", "openai", "--base-url", server.url, "--model", server.model,
                   "--tokenizer", str(model_dir)]  # fmt: skip
            api_runs = measure(api, a)
        finally:
            server.stop()
    hf_runs = measure(["--backend", "hf", "--model", str(model_dir)], a)
    heads = ["backend", "FIFO s", "RR s", "switches", "extra prompt tokens / resume", "extra ms / switch",
             "worker switch ms", "resume first-text ms", "FIFO ms / token", "switch in tokens", "same text",
             "CPU pressure"]  # fmt: skip
    print(f"{a.requests} requests x {a.max_tokens} tokens, quantum {a.quantum_tokens} tokens, 1 slot, greedy\n")
    print(table(heads, [row("API (text, completions resume)", *api_runs), row("HF (logits, KV kept)", *hf_runs)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
