"""``n`` choices against ``n`` separate requests: the prompt prefilled once against ``n`` times.

One daemon (``--slots N``), one long prompt; in turns, ``n`` chats of one ``fork`` group (what the
HTTP front sends for ``n``) and ``n`` separate chats of the same prompt, each seeded, sampled at
temperature 1.  It reports the prompt tokens the workers computed and the wall time until the
last choice is done, as ratios of the two in the same run.

``python -m benchmarks.choices [--model smollm2] [--n 4] [--prompt-words 600] [--tokens 16] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

from benchmarks.common import Daemon, log, print_footer, print_header, table
from ipc.client import AsyncClient


async def _round(endpoint: str, prompt: str, n: int, tokens: int, fork: str | None) -> tuple[float, int, int]:
    async with AsyncClient(endpoint, timeout=600) as c:
        t0 = time.perf_counter()
        extra = {"fork": fork} if fork else {}
        rs = await asyncio.gather(*(c.chat([{"role": "user", "content": prompt}], max_tokens=tokens,
                                           min_tokens=tokens, temperature=1.0, seed=i, **extra)
                                    for i in range(n)))  # fmt: skip
        wall = time.perf_counter() - t0
    return wall, sum(r.stats["prompt_tokens_computed"] for r in rs), rs[0].usage["prompt_tokens"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.choices", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded smollm2)")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, default=600)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    print_header("n choices vs n separate requests", "benchmarks.choices", argv)
    t0 = time.perf_counter()
    words = " ".join(f"word{i % 97}" for i in range(args.prompt_words))
    d = Daemon("choices", ["--slots", str(args.n)], tempfile.mkdtemp(prefix="qd-choices-"), args.model)
    d.spawn()
    d.wait_ready(600.0)
    rows, walls = [], {"fork": 0.0, "separate": 0.0}
    try:
        for r in range(args.rounds):
            for kind in ("fork", "separate"):
                prompt = f"Round {r} {kind}. Summarise: {words}"  # a prompt no earlier round computed
                log(f"round {r}: {kind}")
                wall, computed, plen = asyncio.run(
                    _round(d.endpoint, prompt, args.n, args.tokens, f"g{r}" if kind == "fork" else None)
                )
                walls[kind] += wall
                rows.append((r, kind, args.n, plen, computed, f"{wall:.2f}"))
    finally:
        d.shutdown()
    print(table(["round", "requests", "n", "prompt tokens", "prompt tokens computed", "wall s"], rows))
    fork = sum(row[4] for row in rows if row[1] == "fork")
    sep = sum(row[4] for row in rows if row[1] == "separate")
    print(f"\nprompt tokens computed, n choices / separate: **{fork / sep:.3f}**; "
          f"wall time, n choices / separate: **{walls['fork'] / walls['separate']:.3f}**\n")  # fmt: skip
    print_footer(t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
