"""Batching, sessions, tier switch costs and batch exactness on the real SmolLM2-135M.

Run: ``python -m benchmarks.batching [--quick]``.  Four questions, each answered by ratios measured
within this one run (the machine is shared, so absolute figures drift):

1. Throughput: does the daemon's continuous batching (``--slots 16``, round robin, 100 ms quanta,
   twice as many requests as slots) deliver the tokens/s of a bare batched loop in one process,
   and how much does it gain over one-at-a-time round robin (``--slots 1``)?
2. Sessions: in an agent loop whose conversation grows every turn, does keeping the context under
   a session id make each turn prefill only its new tokens (and keep its latency flat)?
3. Batch exactness: are greedy and seeded-sampling outputs the same in a batch as alone?
4. Switch cost per tier: do the host and disk tiers of ``ContextManager`` run near the speed of a
   bare memcpy and of a bare file write + fsync + read, and where does the cost model put the
   crossover between swapping to disk and recomputing?  (In this process, after the daemons stop.)

The daemons are real ``quantad serve`` subprocesses (SIGTERM at the end, workers checked gone).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backends.hf_model import HFModel
from benchmarks.common import (
    like_a_worker,
    load_engine,
    log,
    median,
    pressure_text,
    prompt_ids,
    table,
    wait_for_quiet,
    with_pressure,
)
from benchmarks.context_switch import HUGE, _memcpy, _switch
from benchmarks.overhead import READY_LINE, REPO, DaemonProc, Pass, chat_messages, daemon_pass, leftover_workers
from contexts import disk as diskfile
from contexts.cost import CostModel
from contexts.manager import ContextManager
from contexts.snapshot import Snapshot
from ipc.client import AsyncClient, ChatResult
from ipc.protocol import TIER_DISK, TIER_HOST

MiB = float(1 << 20)


@dataclass(frozen=True)
class Settings:
    requests: int = 32  # concurrent requests in the throughput passes (twice the slots: RR must preempt)
    slots: int = 16  # batch size of the daemon, of the bare loop and of the exactness runs
    max_tokens: int = 32
    quantum_ms: float = 100.0
    turns: int = 8  # agent loop turns
    turn_tokens: int = 90  # new user text per turn, in tokens
    turn_max_tokens: int = 16  # the model's reply per turn
    session_reps: int = 3  # whole agent loops; TTFT is the median over them
    switch_tokens: int = 512
    switch_repeats: int = 8
    exact_tokens: int = 32
    temperature: float = 0.8
    top_p: float = 0.95


QUICK = Settings(
    requests=8, slots=4, max_tokens=16, turns=4, session_reps=1, switch_repeats=3, exact_tokens=16
)  # fmt: skip


# ---- daemons ------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (its workers), from /proc."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    return kids


class Daemon(DaemonProc):
    """``quantad serve`` with any flags (``DaemonProc`` fixes ``--policy rr``), disk state kept in ``tmpdir``."""

    def __init__(self, name: str, model: str, flags: Sequence[str], tmpdir: str):
        self.name, self.flags = name, " ".join(flags)
        self.endpoint = f"ipc://{tmpdir}/{name}.sock"
        state = os.path.join(tmpdir, f"{name}-state")
        cmd = [sys.executable, "-m", "scheduler", "serve", *flags, "--endpoint", self.endpoint, "--model", model,
               "--state-dir", state, "--log-level", "WARNING"]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        self.exit_code: int | None = None
        self.left: list[int] = []
        self.warnings: list[str] = []  # the daemon's and its workers' warnings and errors

    def _drain(self) -> None:
        """As ``DaemonProc._drain``, also keeping every warning: a lost worker must show in the report."""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.tail.append(line.rstrip())
            if READY_LINE in line:
                self.ready.set()
            elif any(w in line for w in ("level=WARNING", "level=ERROR", "Traceback")):
                self.warnings.append(line.rstrip())

    @property
    def workers_lost(self) -> int:
        return sum("event=worker_lost" in w for w in self.warnings)

    def shutdown(self) -> None:
        """SIGTERM (``DaemonProc.stop``), then make sure no worker of ours outlives it."""
        workers = _children(self.proc.pid)
        self.exit_code = self.stop()
        self.left = leftover_workers(workers)
        for pid in self.left:  # ended by its id, never by name
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def serving(model: str, specs: dict[str, list[str]]) -> Iterator[dict[str, Daemon]]:
    """Start every daemon at once (the model loads overlap), wait until all are ready, stop all at the end."""
    tmpdir = tempfile.mkdtemp(prefix="qd-batch-")
    daemons: dict[str, Daemon] = {}
    try:
        for name, flags in specs.items():
            log(f"starting quantad serve {' '.join(flags)}")
            daemons[name] = Daemon(name, model, flags, tmpdir)
        for d in daemons.values():
            d.wait_ready(600.0)
        yield daemons
    finally:
        for d in daemons.values():
            d.shutdown()
        shutil.rmtree(tmpdir, ignore_errors=True)


def cleanup_report(daemons: dict[str, Daemon]) -> str:
    """Exit codes, leftover workers, and any worker the daemon lost (and restarted) on the way."""
    rows = [(f"quantad serve {d.flags}", d.exit_code, len(d.left), d.workers_lost, len(d.warnings))
            for d in daemons.values()]  # fmt: skip
    text = table(("daemon", "exit code after SIGTERM", "workers left (killed by pid)", "workers lost", "warnings"),
                 rows)  # fmt: skip
    shown = [f"    {d.name}: {w}" for d in daemons.values() for w in d.warnings[:5]]
    return text + ("\n\nFirst warnings of each daemon:\n\n" + "\n".join(shown) if shown else "")


# ---- 1. throughput ------------------------------------------------------------------------------
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


def _nearest(passes: list[Pass], i: int, kind: str) -> list[Pass]:
    """The nearest pass of ``kind`` before and after pass ``i`` (drift hits both sides of a ratio alike)."""
    before = [p for p in passes[:i] if p.kind == kind][-1:]
    after = [p for p in passes[i + 1 :] if p.kind == kind][:1]
    return before + after


async def throughput(engine: HFModel, batched: Daemon, single: Daemon, fifo: Daemon, s: Settings) -> str:
    many, one, nopre = f"quantad --slots {s.slots}", "quantad --slots 1", f"quantad --slots {s.slots} fifo"
    async with contextlib.AsyncExitStack() as stack:
        clients = {kind: await stack.enter_async_context(AsyncClient(d.endpoint, timeout=900.0))
                   for kind, d in ((many, batched), (one, single), (nopre, fifo))}  # fmt: skip
        log("throughput: warming up")
        bare_batch(engine, [engine.render(chat_messages(0))] * 2, 2)
        for kind, c in clients.items():
            n = 1 if kind == one else s.slots
            await asyncio.gather(*(c.chat(chat_messages(i), max_tokens=2, temperature=0) for i in range(n)))
        passes: list[Pass] = []
        steps: list[float] = []
        for kind in ("bare", many, one, many, nopre, many, "bare", many, "bare"):
            log(f"throughput: {kind} pass, {s.requests} requests x {s.max_tokens} tokens")
            if kind == "bare":
                passes.append(bare_pass(engine, s, steps))
            else:
                p = await daemon_pass(clients[kind], s.requests, s.max_tokens)
                passes.append(dataclasses.replace(p, kind=kind))
    rows = []
    for i, p in enumerate(passes):
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
        rows.append((p.kind, completion, f"{p.wall_s:.2f}", f"{p.tps:.1f}", pre, switch, restarts, vs))

    def best(kind: str) -> Pass:
        return min((p for p in passes if p.kind == kind), key=lambda p: p.wall_s)

    ref = passes[0].outputs
    assert all(p.outputs == ref for p in passes if p.kind == "bare"), "the bare loop is not deterministic"
    same = {k: [sum(a == b for a, b in zip(p.outputs, ref, strict=True)) for p in passes if p.kind == k]
            for k in (many, one, nopre)}  # fmt: skip
    b_many = best(many)
    vs_bare = [p.tps / median([q.tps for q in _nearest(passes, i, "bare")])
               for i, p in enumerate(passes) if p.kind == many]  # fmt: skip
    facts = [
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
    headers = ("pass", "completion tokens", "wall s", "tokens/s", "preemptions", "worker switch s", "restarts",
               "tokens/s ratio to neighbours")  # fmt: skip
    return (
        f"### 1. Throughput ({s.requests} concurrent requests x max {s.max_tokens} tokens, greedy, "
        f"rr quantum {s.quantum_ms:g} ms)\n\n"
        + table(headers, rows)
        + "\n\n"
        + table(("summary", "value"), facts)
        + f"\n\nThe bare loop runs the same {s.requests} chats {s.slots} at a time in this process (left-padded "
        "prefill, attention mask and explicit position ids, one token per row and step, finished rows fed on).  "
        "Daemon passes are timed from the first submit to the last ``done``.  The ratio column compares a pass "
        "with the nearest passes of the other kind before and after it.  Worker switch s: the requests' "
        "``worker_switch_s`` summed (the worker's snapshot + restore time, leaving and joining the batch included)."
    )


# ---- 2. sessions --------------------------------------------------------------------------------
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


# ---- 3. batch exactness -------------------------------------------------------------------------
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


# ---- 4. switch cost per tier --------------------------------------------------------------------
def _file_roundtrip(src: list[torch.Tensor], dst: list[torch.Tensor], path: str) -> float:
    """The floor for the disk tier: the same bytes written, fsynced and read back into preallocated memory."""
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for t in src:
            f.write(t.numpy().reshape(-1).view("uint8").data)
        os.fsync(f.fileno())
    with open(path, "rb", buffering=0) as f:
        for t in dst:
            f.readinto(t.numpy().reshape(-1).view("uint8").data)
    dt = time.perf_counter() - t0
    os.unlink(path)
    return dt


def _disk_switch(cm: ContextManager, snap: Snapshot) -> tuple[Snapshot, float]:
    """A preemption straight to disk (as ``--snapshot-tier disk`` does) and the resume, timed."""
    t0 = time.perf_counter()
    cm.snapshot(0, snap)
    cm.demote(0, TIER_DISK)
    landed = cm.tier_of(0)
    back = cm.restore(0)
    dt = time.perf_counter() - t0
    assert landed == TIER_DISK, f"snapshot landed in tier {landed!r}"
    return back, dt


def _disk_parts(snap: Snapshot, path: str) -> dict[str, float]:
    """Where the disk tier's time goes: the steps ``ContextManager`` takes, called one by one."""
    t0 = time.perf_counter()
    diskfile.checksum(snap.tensors())  # alone, for scale: write and read interleave it
    t1 = time.perf_counter()
    data, file = diskfile.encode(snap.layers, snap.logits, snap.tokens)
    t2 = time.perf_counter()
    file.path = path
    file.nbytes, file.digest = diskfile.write_atomic(path, data)
    t3 = time.perf_counter()
    diskfile.read(file)
    t4 = time.perf_counter()
    diskfile.remove(path)
    return {"checksum": t1 - t0, "encode": t2 - t1, "write": t3 - t2, "read": t4 - t3}


def crossover(cost: CostModel, bytes_per_token: float, fixed_bytes: int, limit: int = 1 << 24) -> int | None:
    """Smallest context (tokens) for which the cost model prefers swapping to disk over recomputing."""

    def disk(t: int) -> bool:
        return cost.prefer_disk(int(t * bytes_per_token) + fixed_bytes, t)

    if not disk(limit):
        return None
    lo, hi = 0, limit  # disk(lo) is False (or lo == 0), disk(hi) is True: both costs are linear in t
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if disk(mid) else (mid, hi)
    return hi


@torch.inference_mode()
def switch_costs(engine: HFModel, s: Settings) -> str:
    n = s.switch_tokens
    ids = prompt_ids(engine, n)
    engine.prefill(ids)  # untimed: the first pass at a new length pays one-off setup
    cache, logits = engine.prefill(ids)
    # contiguous copies, as a worker's snapshot is (a raw file write needs contiguous bytes)
    layers = [(layer.keys.contiguous().clone(), layer.values.contiguous().clone()) for layer in cache.layers]
    snap = Snapshot(layers=layers, logits=logits.clone(), meta=None)
    kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
    nbytes = snap.nbytes
    src = snap.tensors()
    assert all(t.is_contiguous() for t in src), "the raw file baseline writes and reads tensors in place"
    mid = [torch.empty_like(t) for t in src]
    dst = [torch.empty_like(t) for t in src]

    tmpdir = tempfile.mkdtemp(prefix="qd-batch-disk-")
    host_cm = ContextManager(engine.device, device_budget=0, host_budget=HUGE)
    disk_cm = ContextManager(engine.device, device_budget=HUGE, host_budget=HUGE, disk_budget=HUGE, state_dir=tmpdir)
    t: dict[str, list[float]] = collections.defaultdict(list)
    try:
        for r in range(s.switch_repeats + 1):  # round 0 warms up and is dropped
            log(f"switch cost: round {r}/{s.switch_repeats} ({n} tokens, {nbytes / MiB:.1f} MiB)")
            snap, dt, _ = _switch(host_cm, snap, TIER_HOST)
            t["host"].append(dt)
            t["memcpy"].append(_memcpy(src, mid, dst))
            snap, dt = _disk_switch(disk_cm, snap)
            t["disk"].append(dt)
            t["file"].append(_file_roundtrip(src, dst, os.path.join(tmpdir, "raw.bin")))
            for k, v in _disk_parts(snap, os.path.join(tmpdir, "parts.safetensors")).items():
                t[k].append(v)
            t0 = time.perf_counter()
            engine.prefill(ids)
            t["prefill"].append(time.perf_counter() - t0)
            disk_cm.observe_prefill(n, t["prefill"][-1])  # as the worker reports every prefill
        # still exact after all the round trips
        assert all(torch.equal(a, b) for a, b in zip(snap.tensors(), src, strict=True)), "a round trip changed bytes"
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    med = {k: median(v[1:]) for k, v in t.items()}

    def ratio(base: str, tier: str) -> float:
        return median([b / x for b, x in zip(t[base][1:], t[tier][1:], strict=True)])

    per_mib = {k: 1e3 * med[k] / (nbytes / MiB) for k in ("host", "memcpy", "disk", "file")}
    rows = [
        ("host tier (device_budget=0)", f"{1e3 * med['host']:.1f}", f"{per_mib['host']:.2f}", "memcpy",
         f"{per_mib['memcpy']:.2f}", f"**{ratio('memcpy', 'host'):.2f}**"),
        ("disk tier (demote to disk)", f"{1e3 * med['disk']:.1f}", f"{per_mib['disk']:.2f}",
         "file write+fsync+read", f"{per_mib['file']:.2f}", f"**{ratio('file', 'disk'):.2f}**"),
    ]  # fmt: skip
    cm = disk_cm.stats()["cost_model"]
    per_token_s = med["prefill"] / n
    cross = crossover(disk_cm.cost, kv_bytes / n, nbytes - kv_bytes)
    facts = [
        ("snapshot size", f"{nbytes / MiB:.2f} MiB ({kv_bytes / n / 1024:.1f} KiB of KV per token + "
                          f"{(nbytes - kv_bytes) / 1024:.0f} KiB of logits)"),
        (f"recompute: prefill of {n} tokens", f"{1e3 * med['prefill']:.0f} ms = {1e3 * per_token_s:.2f} ms/token"),
        (f"disk round trip / recompute, {n} tokens", f"{med['disk'] / med['prefill']:.3f}"),
        (f"host round trip / recompute, {n} tokens", f"{med['host'] / med['prefill']:.4f}"),
        ("cost model estimates (stats()['cost_model'])",
         f"write {cm['write_Bps'] / 1e9:.2f} GB/s, read {cm['read_Bps'] / 1e9:.2f} GB/s, "
         f"prefill {cm['prefill_tps']:.0f} tokens/s"),
        ("**cost model: swap to disk cheaper than recompute from**",
         f"**{cross} tokens**" if cross else "never (recompute always cheaper)"),
        ("disk tier decisions / corrupt fallbacks / disk errors",
         f"{disk_cm.decisions} / {disk_cm.corrupt_fallbacks} / {disk_cm.disk_errors}"),
    ]  # fmt: skip
    parts = [
        ("encode: safetensors header (the checksum is left for the writer)", f"{1e3 * med['encode']:.1f}"),
        ("write_atomic: xxh3 + write, tensor by tensor; header patch, fsync, rename", f"{1e3 * med['write']:.1f}"),
        ("read: validation; readinto + xxh3, tensor by tensor", f"{1e3 * med['read']:.1f}"),
        ("(one xxh3 pass over the whole snapshot alone, for scale)", f"{1e3 * med['checksum']:.1f}"),
        ("raw file write + fsync + read of the same bytes (baseline)", f"{1e3 * med['file']:.1f}"),
    ]
    headers = ("tier", "snapshot+restore ms", "ms / MiB", "baseline", "baseline ms / MiB", "baseline / tier")
    return (
        f"### 4. Switch cost per tier ({n}-token SmolLM2 KV cache, median of {s.switch_repeats})\n\n"
        + table(headers, rows)
        + "\n\n"
        + table(("summary", "value"), facts)
        + "\n\n"
        + table(("where the disk tier's time goes (``contexts.disk`` steps called one by one)", "ms"), parts)
        + "\n\nTarget: baseline / tier >= 0.8.  Baselines move the same bytes with nothing else: two ``copy_`` "
        "into preallocated tensors (out and back), and a raw write of the tensor bytes + fsync + ``readinto`` "
        "preallocated tensors, in the same directory.  The disk tier also encodes safetensors, checksums "
        "(xxh3) on write and on read, starts the disk's writeback every 4 MiB as it writes (``sync_file_range``: "
        "the baseline leaves it all to its fsync, which is why the tier can beat it) and renames atomically "
        "(no directory fsync: snapshots never outlive their process); a resumed file is unlinked in the "
        "background, and neither side times the unlink.  Each round "
        "times all four "
        "back to back, plus a prefill of the same tokens (fed to the cost model, as the worker does); ratios are "
        "medians of per-round ratios.  The crossover solves the cost model's linear estimates "
        "(``CostModel.prefer_disk``) for the context length."
    )


# ---- main ---------------------------------------------------------------------------------------
PARTS = ("throughput", "sessions", "exactness", "switch")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.batching", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 requests, 4 slots, 16 tokens, 4 turns (~1.5 min idle)")
    ap.add_argument("--model", default="smollm2", help="model (default: embedded SmolLM2-135M)")
    ap.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each part, wait up to S seconds for CPU pressure (PSI avg10) to fall under 10%%",
    )
    return ap


def daemon_specs(s: Settings, parts: set[str]) -> dict[str, list[str]]:
    """The ``quantad serve`` flags each chosen part needs."""
    rr = ["--policy", "rr", "--quantum-ms", f"{s.quantum_ms:g}"]
    specs: dict[str, list[str]] = {}
    if parts & {"throughput", "sessions"}:
        specs["rr16"] = ["--slots", str(s.slots), *rr]
    if "throughput" in parts:
        specs["rr1"] = ["--slots", "1", *rr]
    if parts & {"throughput", "exactness"}:
        specs["fifo16"] = ["--slots", str(s.slots), "--policy", "fifo"]
    if "exactness" in parts:
        specs["fifo1"] = ["--slots", "1", "--policy", "fifo"]
    return specs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    like_a_worker("benchmarks.batching")  # in-process switches with the workers' malloc settings
    s = QUICK if args.quick else Settings()
    parts = set(args.only or PARTS)
    t0 = time.perf_counter()
    print(f"## quantad batching benchmarks ({'quick' if args.quick else 'default'} sizes)\n")
    print(f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"- command: python -m benchmarks.batching {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, no GPU")  # fmt: skip
    print(f"- CPU pressure at start (PSI some avg60, share of time a task waited for a CPU): {pressure_text()}\n")
    engine = load_engine(args.model)

    def part(run: Callable[[], str]) -> None:
        wait_for_quiet(args.wait_quiet)
        print(with_pressure(run) + "\n", flush=True)

    if specs := daemon_specs(s, parts):
        with serving(args.model, specs) as daemons:
            if "throughput" in parts:
                part(lambda: asyncio.run(throughput(engine, daemons["rr16"], daemons["rr1"], daemons["fifo16"], s)))
            if "sessions" in parts:
                part(lambda: asyncio.run(sessions(engine, daemons["rr16"], s)))
            if "exactness" in parts:
                part(lambda: asyncio.run(exactness(daemons["fifo1"], daemons["fifo16"], s)))
        print(cleanup_report(daemons) + "\n", flush=True)
        left = [pid for d in daemons.values() for pid in d.left]
        if left:
            raise RuntimeError(f"worker processes {left} outlived their daemon's SIGTERM (killed them)")
    if "switch" in parts:
        part(lambda: switch_costs(engine, s))
    print(f"- CPU pressure at end: {pressure_text()}; total {time.perf_counter() - t0:.0f} s")
    log(f"all done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
