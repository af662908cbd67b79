"""Sessions: an agent loop whose conversation grows every turn, with and without a session id.

Does keeping the context under a session id make each turn prefill only its new tokens, and keep its
time to first token flat while the conversation grows?  The same loop runs twice on one daemon
(``--slots 16 --policy rr``), turn by turn interleaved: once re-sending the whole conversation each
turn, once under a session; greedy replies must be the same both ways.

``python -m benchmarks.sessions [--quick]`` (also part of ``python -m benchmarks.batching``).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from backends.hf_model import HFModel
from benchmarks import suite
from benchmarks.common import Daemon, log, median, serve_flags, table
from ipc.client import AsyncClient, ChatResult


@dataclass(frozen=True)
class Settings:
    slots: int = 16  # batch size of the daemon (the same daemon as the throughput part's)
    quantum_ms: float = 100.0
    turns: int = 8  # agent loop turns
    turn_tokens: int = 90  # new user text per turn, in tokens
    turn_max_tokens: int = 16  # the model's reply per turn
    session_reps: int = 3  # whole agent loops; TTFT is the median over them


QUICK = Settings(slots=4, turns=4, session_reps=1)


def daemons(s: Settings) -> dict[str, list[str]]:
    return {"rr16": serve_flags("rr", s.slots, s.quantum_ms)}


_FACTS = [
    "The tide tables for the northern harbour list two high waters today, at 06:12 and at 18:40.",
    "Our build server reported 14 failing tests after the dependency upgrade, all of them in the parser.",
    "A recipe for rye bread needs 500 g of flour, 10 g of salt, a sourdough starter and a slow proof.",
    "The museum's new wing holds bronze tools, woven baskets and a reconstructed Neolithic house.",
    "Customer 4417 asked whether the invoice from March can be split across two cost centres.",
    "Weather stations on the ridge measured gusts of 92 km/h and a pressure drop of 11 hPa overnight.",
    "The library catalogue search returned 37 results for medieval shipbuilding in the Baltic.",
    "Sensor 12 in the greenhouse reads 31 degrees and 78 percent humidity; the vents are closed.",
    "The train to Lyon leaves from platform 7, and the connection in Dijon has a 9 minute margin.",
    "Profiling shows that 61 percent of the request time is spent serialising JSON responses.",
    "The choir rehearses the second movement on Thursday; the soloist is still learning the Latin.",
    "A survey of 220 households found that most prefer evening pickup for recycled glass.",
    "The telescope log notes thin clouds after midnight and a clear view of Jupiter's moons.",
    "Inventory shows 18 spare pumps, 4 of them the older model that needs a different gasket.",
    "The city council will vote on the cycle lane on Elm Street after the public comment period.",
    "Our translation memory matched 83 percent of the new manual against last year's version.",
]


def turn_text(engine: HFModel, turn: int, n_tokens: int) -> str:
    """About ``n_tokens`` of tool-output-like text, different every turn (so no turn repeats another)."""
    rng = random.Random(turn)
    facts = rng.sample(_FACTS, len(_FACTS))
    text = f"Observation {turn + 1}: " + " ".join(facts)
    ids = engine.tokenizer(text)["input_ids"][: n_tokens - 12]
    return engine.tokenizer.decode(ids).rstrip() + " What should we check next? Answer briefly."


@dataclass
class Turn:
    prompt: int
    computed: int
    reused: int
    ttft_s: float
    reply: list[int]


async def agent_loops(
    client: AsyncClient, texts: list[str], max_tokens: int, session: str
) -> tuple[list[Turn], list[Turn]]:
    """The same agent loop twice, turn by turn interleaved: without a session and with one."""
    convs: dict[str, list[dict[str, str]]] = {"": [], session: []}
    turns: dict[str, list[Turn]] = {"": [], session: []}
    for text in texts:
        for sid, conv in convs.items():
            conv.append({"role": "user", "content": text})
            r: ChatResult = await client.chat(list(conv), max_tokens=max_tokens, temperature=0, session=sid or None)
            conv.append({"role": "assistant", "content": r.text})
            st = r.stats
            computed, reused = int(st["prompt_tokens_computed"]), int(st.get("prompt_tokens_reused", 0))
            turns[sid].append(Turn(int(r.usage["prompt_tokens"]), computed, reused, float(st["ttft_s"]), r.token_ids))
    return turns[""], turns[session]


async def sessions(engine: HFModel, daemon: Daemon, s: Settings) -> str:
    texts = [turn_text(engine, t, s.turn_tokens) for t in range(s.turns)]
    runs: list[tuple[list[Turn], list[Turn]]] = []
    async with AsyncClient(daemon.endpoint, timeout=900.0) as c:
        for rep in range(s.session_reps):
            log(f"sessions: agent loop {rep + 1}/{s.session_reps}, {s.turns} turns, with and without a session")
            runs.append(await agent_loops(c, texts, s.turn_max_tokens, f"bench-{rep}"))
    plain, kept = runs[0]
    ttft_plain = [median([r[0][t].ttft_s for r in runs]) for t in range(s.turns)]
    ttft_kept = [median([r[1][t].ttft_s for r in runs]) for t in range(s.turns)]
    rows = [
        (t + 1, p.prompt, p.computed, k.prompt, k.computed, k.reused, f"{1e3 * ttft_plain[t]:.0f}",
         f"{1e3 * ttft_kept[t]:.0f}", "yes" if p.reply == k.reply else "NO")
        for t, (p, k) in enumerate(zip(plain, kept, strict=True))
    ]  # fmt: skip
    total_prompt = sum(k.prompt for k in kept)
    total_computed = sum(k.computed for k in kept)
    same = sum(p.reply == k.reply for r in runs for p, k in zip(*r, strict=True))
    facts = [
        ("**prompt tokens computed with the session / prompt tokens**",
         f"**{total_computed} / {total_prompt} = {total_computed / total_prompt:.3f}** (target <= 0.25)"),
        ("prompt tokens computed without it / prompt tokens",
         f"{sum(p.computed for p in plain)} / {sum(p.prompt for p in plain)}"),
        (f"**TTFT turn {s.turns} / turn 1 with the session**",
         f"**{ttft_kept[-1] / ttft_kept[0]:.2f}** (target <= 1.5)"),
        (f"TTFT turn {s.turns} / turn 1 without it", f"{ttft_plain[-1] / ttft_plain[0]:.2f}"),
        (f"TTFT turn {s.turns}, session / no session", f"{ttft_kept[-1] / ttft_plain[-1]:.2f}"),
        ("replies identical with and without the session", f"{same} / {s.turns * len(runs)}"),
    ]  # fmt: skip
    return (
        f"### 2. Sessions (agent loop, {s.turns} turns of ~{s.turn_tokens} new user tokens + a reply of max "
        f"{s.turn_max_tokens}, greedy)\n\n"
        + table(
            (
                "turn",
                "prompt",
                "computed",
                "prompt (session)",
                "computed (session)",
                "reused (session)",
                "TTFT ms",
                "TTFT ms (session)",
                "same reply",
            ),
            rows,
        )  # fmt: skip
        + "\n\n"
        + table(("summary", "value"), facts)
        + f"\n\nBoth loops run on the same daemon (``--slots {s.slots} --policy rr``), turn by turn interleaved, one "
        f"request at a time.  TTFT (the daemon's ``ttft_s``: submit to first token) is the median over "
        f"{len(runs)} loop(s), each with a fresh session id; token counts are from the first loop."
    )


def run(engine: HFModel, daemons: dict[str, Daemon], s: Settings) -> str:
    return asyncio.run(sessions(engine, daemons["rr16"], s))


PART = suite.Part("sessions", Settings(), QUICK, daemons, run)


def main(argv: list[str] | None = None) -> int:
    return suite.main("benchmarks.sessions", "quantad sessions benchmark", [PART], argv,
                      __doc__.splitlines()[0], "4 slots, 4 turns, one loop")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
