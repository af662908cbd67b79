"""The prefill floor of a burst: how soon llama.cpp itself could give the last request its first token.

In a burst every prompt must be prefilled before the last of them gets a first token, whatever
the schedule.  This takes the prompt tokens quantad's llama.cpp engine computed in a run (each
record's ``prompt_tokens_computed``, after its prefix cache) and prefills as many tokens of the
default GGUF with a plain ``llama_decode`` loop, ``--slots`` prompts a decode, on the threads a
worker uses.  Each prompt starts at the position where its shared prefix ended, with none of
that prefix's cells in the cache: its attention spans fewer cells than in the run, so this is a
lower bound.  The median of ``--rounds`` rounds is the floor.

On 2 cores it is prefill arithmetic, ~300-360 tokens/s, against ~190 tokens/s of a 16-row decode
step: the floor of a burst's p99 time to first token is near a third of llama-server's, which
prefills half the burst, decodes it to the end and then prefills the other half.

``python -m benchmarks.prefill_floor RESULTS.json`` prints the floor beside each point of a
``quantad bench`` report (``benchmarks.engines`` adds it to its burst table).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Iterable

from benchmarks.common import median, table
from benchmarks.harness.report import metric

Prompt = tuple[int, int]  # (first position computed, tokens computed)


def computed_prompts(records: Iterable[dict]) -> list[Prompt]:
    """Each request's computed part of its prompt, in the order the run's records list them."""
    out = []
    for r in records:
        stats = r.get("stats") or {}
        n = int(stats.get("prompt_tokens_computed", r.get("prompt_tokens", 0)))
        if n > 0:
            out.append((int(stats.get("prompt_tokens_reused", 0)), n))
    return out


def of_report(points: list[dict], slots: int = 16, rounds: int = 3) -> tuple[list[Prompt], float] | None:
    """The first quantad point's computed prompts and their floor; None when the report has no such point."""
    ours = next((p for p in points if p["target"] == "quantad" and not p.get("error")), None)
    if ours is None:
        return None
    prompts = computed_prompts(ours["records"])
    return prompts, floor_s(prompts, slots, rounds=rounds)


def floor_s(prompts: list[Prompt], slots: int = 16, threads: int = 0, rounds: int = 3) -> float:
    """Seconds a plain decode loop takes to prefill ``prompts``, ``slots`` to a decode (median of rounds)."""
    from backends.llama_model import LlamaModel
    from backends.model_store import default_gguf

    m = LlamaModel(str(default_gguf()), slots=slots, threads=threads or os.cpu_count() or 1)
    rng = random.Random(0)
    try:
        times = []
        for _ in range(rounds):
            total = 0.0
            for at in range(0, len(prompts), slots):
                wave = [(m.acquire(), pos, n) for pos, n in prompts[at : at + slots]]
                rows = [(sid, pos, [rng.randrange(1000, 20000) for _ in range(n)]) for sid, pos, n in wave]
                for part in _fitting(rows, m.n_batch):
                    t0 = time.perf_counter()
                    m.decode(part)
                    total += time.perf_counter() - t0
                for sid, _, n in wave:
                    m.release(sid, n)
            times.append(total)
        return median(times)
    finally:
        m.close()


def _fitting(rows: list[tuple[int, int, list[int]]], n_batch: int) -> list[list[tuple[int, int, list[int]]]]:
    """The rows in decodes of at most ``n_batch`` tokens (a prompt longer than that is split)."""
    parts: list[list[tuple[int, int, list[int]]]] = [[]]
    room = n_batch
    for sid, pos, ids in rows:
        while ids:
            if room == 0:
                parts.append([])
                room = n_batch
            take, ids = ids[:room], ids[room:]
            parts[-1].append((sid, pos, take))
            pos, room = pos + len(take), room - len(take)
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prefill_floor", description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a quantad bench results.json of a run on --backend llamacpp")
    ap.add_argument("--slots", type=int, default=16, help="prompts per decode (the run's --slots)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the floor is their median")
    args = ap.parse_args(argv)
    points = json.load(open(args.results))["points"]
    found = of_report(points, args.slots, args.rounds)
    if found is None:
        print("no quantad point in the report", file=sys.stderr)
        return 2
    prompts, floor = found
    rows = []
    for p in points:
        p99 = metric(p, "overall.ttft_s.p99")
        cells = ["failed", "-"] if p99 is None else [f"{p99:.2f}", f"{p99 / floor:.2f}"]
        rows.append([p["label"], *cells])
    print(f"prefill floor: {sum(n for _, n in prompts)} prompt tokens of {len(prompts)} requests in {floor:.2f} s")
    print(table(["point", "p99 TTFT s", "/ floor"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
