"""Throughput: the daemon's continuous batching against a bare batched loop in one process.

Does ``quantad serve --slots 16`` (round robin, 100 ms quanta, twice as many requests as slots, so it
must preempt) deliver the tokens/s of a bare batched loop of 16 in this process, and how much does it
gain over one-at-a-time round robin (``--slots 1``)?  A FIFO daemon of 16 slots (no preemption) is
measured too.  Passes interleave, bare / batched / one at a time / batched / FIFO / ..., and each pass
is compared with the nearest passes of the kind it is measured against; greedy outputs must match the
bare loop's token for token.

``python -m benchmarks.throughput [--quick]`` (also part of ``python -m benchmarks.batching``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backends.hf_model import HFModel
from benchmarks import suite
from benchmarks.common import Daemon, Pass, chat_messages, daemon_pass, log, median, serve_flags, table
from ipc.client import AsyncClient


@dataclass(frozen=True)
class Settings:
    requests: int = 32  # concurrent requests in each pass (twice the slots: RR must preempt)
    slots: int = 16  # batch size of the daemon and of the bare loop
    max_tokens: int = 32
    quantum_ms: float = 100.0

    @property
    def kinds(self) -> tuple[str, str, str]:
        """The pass labels of the three daemons: batched round robin, one slot, batched FIFO."""
        return f"quantad --slots {self.slots}", "quantad --slots 1", f"quantad --slots {self.slots} fifo"


QUICK = Settings(requests=8, slots=4, max_tokens=16)


def daemons(s: Settings) -> dict[str, list[str]]:
    return {
        "rr16": serve_flags("rr", s.slots, s.quantum_ms),
        "rr1": serve_flags("rr", 1, s.quantum_ms),
        "fifo16": serve_flags("fifo", s.slots),
    }


# ---- the bare loop ------------------------------------------------------------------------------
@torch.inference_mode()
def bare_batch(
    engine: HFModel, prompts: list[list[int]], max_tokens: int, step_times: list[float] | None = None
) -> list[list[int]]:
    """One static batch, greedy: left-padded prefill, then one token per row and step over a DynamicCache.

    Rows that finished keep being fed (their tokens are dropped): the simplest batched loop.  Decode step
    times go to ``step_times``: set against the quantum, they tell how often the daemon must preempt.
    """
    width = max(len(p) for p in prompts)
    pad = int(engine.tokenizer.pad_token_id or 0)
    x = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=engine.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=engine.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = engine.new_cache()
    out = engine.model(input_ids=x, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                       logits_to_keep=1)  # fmt: skip
    lengths = mask.sum(-1, keepdim=True)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    while True:
        tokens = out.logits[:, -1, :].float().argmax(-1)
        for i, t in enumerate(tokens.tolist()):
            if not done[i]:
                outputs[i].append(t)
                done[i] = t in engine.eos_ids or len(outputs[i]) >= max_tokens
        if all(done):
            return outputs
        mask = F.pad(mask, (0, 1), value=1)
        t0 = time.perf_counter()
        out = engine.model(input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=lengths, cache=cache,
                           use_cache=True)  # fmt: skip
        lengths = lengths + 1
        if step_times is not None:
            step_times.append(time.perf_counter() - t0)


def bare_pass(engine: HFModel, s: Settings, step_times: list[float]) -> Pass:
    """The same requests as a daemon pass, ``slots`` at a time (rendering included, as the worker does it)."""
    t0 = time.perf_counter()
    outputs: list[list[int]] = []
    for start in range(0, s.requests, s.slots):
        batch = [engine.render(chat_messages(i)) for i in range(start, min(start + s.slots, s.requests))]
        outputs += bare_batch(engine, batch, s.max_tokens, step_times)
    return Pass("bare", outputs, time.perf_counter() - t0)


# ---- the passes ---------------------------------------------------------------------------------
async def _warm_up(engine: HFModel, clients: dict[str, AsyncClient], s: Settings) -> None:
    """A short batch in this process and on every daemon: a process's first passes pay one-off setup."""
    log("throughput: warming up")
    bare_batch(engine, [engine.render(chat_messages(0))] * 2, 2)
    for kind, c in clients.items():
        n = 1 if kind == s.kinds[1] else s.slots
        await asyncio.gather(*(c.chat(chat_messages(i), max_tokens=2, temperature=0) for i in range(n)))


async def measure(engine: HFModel, daemons: dict[str, Daemon], s: Settings) -> tuple[list[Pass], list[float]]:
    """The interleaved passes, and the bare loop's decode step times."""
    many, one, nopre = s.kinds
    by_kind = {many: daemons["rr16"], one: daemons["rr1"], nopre: daemons["fifo16"]}
    async with contextlib.AsyncExitStack() as stack:
        clients = {kind: await stack.enter_async_context(AsyncClient(d.endpoint, timeout=900.0))
                   for kind, d in by_kind.items()}  # fmt: skip
        await _warm_up(engine, clients, s)
        passes: list[Pass] = []
        steps: list[float] = []
        for kind in ("bare", many, one, many, nopre, many, "bare", many, "bare"):
            log(f"throughput: {kind} pass, {s.requests} requests x {s.max_tokens} tokens")
            if kind == "bare":
                passes.append(bare_pass(engine, s, steps))
            else:
                p = await daemon_pass(clients[kind], s.requests, s.max_tokens)
                passes.append(dataclasses.replace(p, kind=kind))
    return passes, steps


# ---- the report ---------------------------------------------------------------------------------
def _nearest(passes: list[Pass], i: int, kind: str) -> list[Pass]:
    """The nearest pass of ``kind`` before and after pass ``i`` (drift hits both sides of a ratio alike)."""
    before = [p for p in passes[:i] if p.kind == kind][-1:]
    after = [p for p in passes[i + 1 :] if p.kind == kind][:1]
    return before + after


def _row(passes: list[Pass], i: int, s: Settings) -> tuple[object, ...]:
    """One pass: its tokens (checked against the daemon's usage), speed, preemptions and ratio to neighbours."""
    many, one, nopre = s.kinds
    p = passes[i]
    base = {many: "bare", nopre: "bare", one: many}.get(p.kind)
    near = _nearest(passes, i, base) if base else []
    vs = f"{p.tps / median([q.tps for q in near]):.3f} vs {base}" if near else "-"
    completion = sum(int(r.usage.get("completion_tokens", 0)) for r in p.results) if p.results else p.tokens
    assert completion == p.tokens, f"{p.kind}: {p.tokens} tokens streamed, usage says {completion}"
    pre, switch, restarts = "-", "-", "-"
    if p.results:
        restarts = str(sum(int(r.stats.get("restarts", 0)) for r in p.results))
        n_pre = sum(int(r.stats.get("preemptions", 0)) for r in p.results)
        switch_s = sum(float(r.stats.get("worker_switch_s", 0.0)) for r in p.results)
        pre, switch = str(n_pre), f"{switch_s:.1f} ({1e3 * switch_s / max(n_pre, 1):.1f} ms each)"
    return (p.kind, completion, f"{p.wall_s:.2f}", f"{p.tps:.1f}", pre, switch, restarts, vs)


def _facts(passes: list[Pass], steps: list[float], s: Settings) -> list[tuple[str, str]]:
    """The summary: the ratios of the fastest passes, the median ratio, identical outputs, the step time."""
    many, one, nopre = s.kinds

    def best(kind: str) -> Pass:
        return min((p for p in passes if p.kind == kind), key=lambda p: p.wall_s)

    ref = passes[0].outputs
    assert all(p.outputs == ref for p in passes if p.kind == "bare"), "the bare loop is not deterministic"
    same = {k: [sum(a == b for a, b in zip(p.outputs, ref, strict=True)) for p in passes if p.kind == k]
            for k in (many, one, nopre)}  # fmt: skip
    b_many = best(many)
    vs_bare = [p.tps / median([q.tps for q in _nearest(passes, i, "bare")])
               for i, p in enumerate(passes) if p.kind == many]  # fmt: skip
    return [
        (f"**{many} / bare batched loop, tokens/s (fastest pass of each)**",
         f"**{b_many.tps / best('bare').tps:.3f}** (target >= 0.90)"),
        (f"{many} / bare batched loop, tokens/s (median over the {many} passes, each against its neighbours)",
         f"{median(vs_bare):.3f} (each: {', '.join(f'{x:.3f}' for x in vs_bare)})"),
        (f"{nopre} (no preemption: the first {s.slots} run to the end, then the rest) / bare loop, tokens/s",
         f"{best(nopre).tps / best('bare').tps:.3f}"),
        (f"**{many} / {one}, tokens/s (fastest pass of each)**",
         f"**{b_many.tps / best(one).tps:.2f}x** (expect 5-10x)"),
        ("greedy outputs identical to the bare batched loop",
         ", ".join(f"{k}: {'+'.join(map(str, v))} of {s.requests} per pass" for k, v in same.items())),
        (f"bare loop decode step, batch of {s.slots} (median; fastest)",
         f"{1e3 * median(steps):.0f} ms; {1e3 * min(steps):.0f} ms (quantum {s.quantum_ms:g} ms)"),
    ]  # fmt: skip


def report(passes: list[Pass], steps: list[float], s: Settings) -> str:
    rows = [_row(passes, i, s) for i in range(len(passes))]
    headers = ("pass", "completion tokens", "wall s", "tokens/s", "preemptions", "worker switch s", "restarts",
               "tokens/s ratio to neighbours")  # fmt: skip
    return (
        f"### 1. Throughput ({s.requests} concurrent requests x max {s.max_tokens} tokens, greedy, "
        f"rr quantum {s.quantum_ms:g} ms)\n\n"
        + table(headers, rows)
        + "\n\n"
        + table(("summary", "value"), _facts(passes, steps, s))
        + f"\n\nThe bare loop runs the same {s.requests} chats {s.slots} at a time in this process (left-padded "
        "prefill, attention mask and explicit position ids, one token per row and step, finished rows fed on).  "
        "Daemon passes are timed from the first submit to the last ``done``.  The ratio column compares a pass "
        "with the nearest passes of the other kind before and after it.  Worker switch s: the requests' "
        "``worker_switch_s`` summed (the worker's snapshot + restore time, leaving and joining the batch included)."
    )


def run(engine: HFModel, daemons: dict[str, Daemon], s: Settings) -> str:
    return report(*asyncio.run(measure(engine, daemons, s)), s)


PART = suite.Part("throughput", Settings(), QUICK, daemons, run)


def main(argv: list[str] | None = None) -> int:
    return suite.main("benchmarks.throughput", "quantad throughput benchmark", [PART], argv,
                      __doc__.splitlines()[0], "8 requests, 4 slots, 16 tokens")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
