"""Batch exactness: are greedy and seeded-sampling outputs the same in a batch as alone?

The same prompts go to a one-slot FIFO daemon (one request at a time) and to a FIFO daemon of 16
slots (all submitted at once), greedy and then with seeded temperature + nucleus sampling; the
report counts the prompts whose tokens differ and where they first do.

``python -m benchmarks.exactness [--quick]`` (also part of ``python -m benchmarks.batching``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from backends.hf_model import HFModel
from benchmarks import suite
from benchmarks.common import Daemon, chat_messages, log, serve_flags, table
from ipc.client import AsyncClient


@dataclass(frozen=True)
class Settings:
    slots: int = 16  # batch size of the batched daemon, and the number of prompts
    exact_tokens: int = 32
    temperature: float = 0.8
    top_p: float = 0.95


QUICK = Settings(slots=4, exact_tokens=16)


def daemons(s: Settings) -> dict[str, list[str]]:
    return {"fifo16": serve_flags("fifo", s.slots), "fifo1": serve_flags("fifo", 1)}


async def _outputs(endpoint: str, n: int, max_tokens: int, sampled: bool, s: Settings) -> list[list[int]]:
    """``n`` chats submitted at once; with ``sampled``, seeded temperature + nucleus sampling."""
    params = {"temperature": s.temperature, "top_p": s.top_p} if sampled else {"temperature": 0}
    async with AsyncClient(endpoint, timeout=900.0) as c:
        results = await asyncio.gather(
            *(c.chat(chat_messages(i), max_tokens=max_tokens, seed=1000 + i, **params) for i in range(n))
        )
    return [r.token_ids for r in results]


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


async def exactness(alone: Daemon, batched: Daemon, s: Settings) -> str:
    n = s.slots
    log(f"exactness: {n} prompts x {s.exact_tokens} tokens, greedy then sampled, alone and batched")

    # One daemon at a time: two workers side by side on two cores would slow each other down badly.
    g1, s1 = [await _outputs(alone.endpoint, n, s.exact_tokens, sampled, s) for sampled in (False, True)]
    gb, sb = [await _outputs(batched.endpoint, n, s.exact_tokens, sampled, s) for sampled in (False, True)]
    rows, facts = [], []
    for name, a, b in (("greedy", g1, gb), (f"seeded sampling (T {s.temperature}, top_p {s.top_p})", s1, sb)):
        diverged = [(i, _first_difference(x, y)) for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        where = ", ".join(f"#{i} at token {k}" for i, k in diverged) or "-"
        rows.append((name, f"{n - len(diverged)} / {n}", f"**{len(diverged) / n:.3f}**", where))
    facts.append(("alone", f"quantad serve {alone.flags} (one request at a time)"))
    facts.append(("batched", f"quantad serve {batched.flags} ({n} submitted at once)"))
    return (
        f"### 3. Batch exactness ({n} prompts x {s.exact_tokens} tokens, alone vs batched)\n\n"
        + table(("decoding", "identical", "divergence rate", "diverging prompts (first differing token)"), rows)
        + "\n\n"
        + table(("run", "daemon"), facts)
        + "\n\nSeeds are fixed per prompt (1000 + i); a row's random stream depends only on (seed, step), so any "
        "divergence comes from the batched arithmetic (different logits), not from the sampler."
    )


def run(engine: HFModel, daemons: dict[str, Daemon], s: Settings) -> str:
    return asyncio.run(exactness(daemons["fifo1"], daemons["fifo16"], s))


PART = suite.Part("exactness", Settings(), QUICK, daemons, run)


def main(argv: list[str] | None = None) -> int:
    return suite.main("benchmarks.exactness", "quantad batch exactness benchmark", [PART], argv,
                      __doc__.splitlines()[0], "4 prompts x 16 tokens")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
