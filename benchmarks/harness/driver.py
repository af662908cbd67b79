"""Drive a workload against one target and time every call from the client's side.

Two targets with one interface: the quantad daemon (``ipc.client.AsyncClient``, streaming
events) and an OpenAI-compatible peer (``openai.AsyncOpenAI``, streaming chunks).  Each call
gives a ``Record`` of client-side timestamps (seconds from the start of the run) plus what
the server reported.  The time the driver spends in its own code per event is summed too, so
the harness can report its overhead.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from benchmarks.harness.workloads import Call, Workload
from ipc import events as E


@dataclass
class Record:
    idx: int
    agent: str
    session: str
    cls: str
    turn: int
    max_tokens: int
    planned_s: float = 0.0
    submit_s: float | None = None
    first_token_s: float | None = None
    done_s: float | None = None
    tokens: int = 0  # completion tokens
    prompt_tokens: int | None = None
    preemptions: int = 0  # `preempted` events seen
    resumes: int = 0
    finish_reason: str | None = None
    error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # the daemon's done stats
    prompt_computed: int | None = None  # prompt tokens the server computed (less what it reused from a cache)
    driver_s: float = 0.0  # time spent in the driver's own code for this call
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens) of each token event or chunk

    @property
    def ok(self) -> bool:
        return self.error is None and self.done_s is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Target(Protocol):
    name: str

    async def call(self, call: Call, messages: list[dict[str, str]], rec: Record, clock: Clock) -> str: ...


class Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0


class QuantadTarget:
    """The daemon through ``AsyncClient``: one socket, every call in flight on it."""

    name = "quantad"

    def __init__(self, endpoint: str, temperature: float = 0.0, seed: int = 0):
        from ipc.client import AsyncClient

        self.client = AsyncClient(endpoint)
        self.temperature = temperature
        self.seed = seed

    async def call(self, call: Call, messages: list[dict[str, str]], rec: Record, clock: Clock) -> str:

        text: list[str] = []
        rec.submit_s = clock.now()
        stream = await self.client.chat(
            messages, stream=True, max_tokens=call.max_tokens, min_tokens=call.min_tokens or None,
            temperature=self.temperature, seed=(self.seed * 1_000_003 + call.idx) % 2**63, agent=call.agent,
            session=call.session or None,
        )  # fmt: skip
        async for ev in stream:
            t_in = time.perf_counter()
            if isinstance(ev, E.Token):
                now = clock.now()
                if rec.first_token_s is None:
                    rec.first_token_s = now
                rec.arrivals.append((round(now, 4), len(ev.token_ids) or 1))
                text.append(ev.text)
            elif isinstance(ev, E.Preempted):
                rec.preemptions += 1
            elif isinstance(ev, E.Resumed):
                rec.resumes += 1
            elif isinstance(ev, E.Done):
                rec.done_s = clock.now()
                rec.tokens = int(ev.usage.get("completion_tokens", 0))
                rec.prompt_tokens = ev.usage.get("prompt_tokens")
                rec.finish_reason = ev.finish_reason
                rec.stats = dict(ev.stats)
                rec.prompt_computed = rec.stats.get("prompt_tokens_computed")
            elif isinstance(ev, E.Error):
                rec.error = f"{ev.code}: {ev.message}"
                rec.stats = dict(ev.stats or {})
            elif isinstance(ev, E.Cancelled):
                rec.error = f"{ev.event}: {ev.message}"
                rec.stats = dict(ev.stats or {})
            rec.driver_s += time.perf_counter() - t_in
        return "".join(text)

    async def ping_ms(self, n: int = 20) -> float:
        """Median round trip of a ``ping`` through the daemon: the client and socket cost, no model."""
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await self.client.ping()
            times.append((time.perf_counter() - t) * 1000.0)
        return sorted(times)[len(times) // 2]

    async def close(self) -> None:
        await self.client.close()


class OpenAITarget:
    """An OpenAI-compatible server (the peer), streamed so TTFT is seen."""

    name = "peer"

    def __init__(self, base_url: str, model: str, temperature: float = 0.0, eos_token_id: Any = None):
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=3600)
        self.model = model
        self.temperature = temperature
        self.eos_token_id = eos_token_id

    def _extra(self, call: Call) -> dict[str, Any]:
        """Lengths as for quantad: ``transformers serve`` takes a whole generation config per request.

        Its continuous batching honours a request's ``max_new_tokens`` and ``eos_token_id`` but
        not ``min_new_tokens``; with min_tokens = max_tokens the EOS id is -1 (none), so exactly
        ``max_tokens`` come back.  A smaller min_tokens cannot be enforced there (noted in results).
        """
        if not call.min_tokens:
            return {}
        exact = call.min_tokens >= call.max_tokens
        gc: dict[str, Any] = {"max_new_tokens": call.max_tokens, "min_new_tokens": call.min_tokens,
                              "do_sample": self.temperature > 0,
                              "eos_token_id": -1 if exact else self.eos_token_id}  # fmt: skip
        if self.temperature > 0:
            gc["temperature"] = self.temperature
        return {"extra_body": {"generation_config": json.dumps(gc)}}

    async def call(self, call: Call, messages: list[dict[str, str]], rec: Record, clock: Clock) -> str:
        text: list[str] = []
        chunks = 0
        rec.submit_s = clock.now()
        try:
            stream = await self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=call.max_tokens, temperature=self.temperature,
                stream=True, stream_options={"include_usage": True}, **self._extra(call),
            )  # fmt: skip
            async for chunk in stream:
                t_in = time.perf_counter()
                if chunk.choices and chunk.choices[0].delta.content:
                    now = clock.now()
                    if rec.first_token_s is None:
                        rec.first_token_s = now
                    rec.arrivals.append((round(now, 4), 1))
                    text.append(chunk.choices[0].delta.content)
                    chunks += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    rec.finish_reason = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    rec.tokens = chunk.usage.completion_tokens
                    rec.prompt_tokens = chunk.usage.prompt_tokens
                computed = prompt_computed(chunk)
                if computed is not None:
                    rec.prompt_computed = computed
                rec.driver_s += time.perf_counter() - t_in
        except Exception as exc:  # the peer's failures are results too
            rec.error = f"{type(exc).__name__}: {exc}"
            return "".join(text)
        rec.done_s = clock.now()
        rec.tokens = rec.tokens or chunks
        return "".join(text)

    async def close(self) -> None:
        await self.client.close()


def prompt_computed(chunk: Any) -> int | None:
    """Prompt tokens a server computed for a request: llama-server's ``timings.prompt_n``, else the prompt
    less OpenAI's ``usage.prompt_tokens_details.cached_tokens`` (quantad's HTTP front)."""
    timings = (chunk.model_extra or {}).get("timings") or {}
    if isinstance(timings.get("prompt_n"), int):
        return timings["prompt_n"]
    if chunk.usage is None:
        return None
    cached = getattr(chunk.usage.prompt_tokens_details, "cached_tokens", None)
    return None if cached is None else chunk.usage.prompt_tokens - cached


def new_record(call: Call) -> Record:
    return Record(idx=call.idx, agent=call.agent, session=call.session, cls=call.cls, turn=call.turn,
                  max_tokens=call.max_tokens, planned_s=call.arrival_s)  # fmt: skip


async def drive(target: Target, workload: Workload, on_done=None) -> tuple[list[Record], dict[str, float]]:
    """Run the whole workload; return the records (by call index) and the run's own costs."""
    clock = Clock()
    cpu0 = time.process_time()
    records: dict[int, Record] = {}

    async def one(call: Call, messages: list[dict[str, str]]) -> str:
        rec = records[call.idx] = new_record(call)
        try:
            text = await target.call(call, messages, rec, clock)
        except Exception as exc:  # a failed call is a result; the run goes on
            rec.error = f"{type(exc).__name__}: {exc}"
            text = ""
        if on_done is not None:
            on_done(rec)
        return text

    async def arrive(call: Call) -> None:
        await asyncio.sleep(max(0.0, call.arrival_s - clock.now()))
        await one(call, [{"role": "user", "content": call.prompt}])

    async def loop(calls) -> None:
        messages: list[dict[str, str]] = [{"role": "system", "content": calls[0].system}] if calls[0].system else []
        for call in calls:
            await asyncio.sleep(call.think_s)
            messages.append({"role": "user", "content": call.prompt})
            text = await one(call, list(messages))
            messages.append({"role": "assistant", "content": text})
            await asyncio.sleep(call.tool_s)  # the tool runs; its output opens the next turn

    if workload.closed:
        await asyncio.gather(*(loop(lp.calls) for lp in workload.loops))
    else:
        await asyncio.gather(*(arrive(c) for c in workload.calls))
    wall = clock.now()
    lateness = [r.submit_s - r.planned_s for r in records.values() if r.submit_s is not None and not workload.closed]
    costs = {
        "wall_s": wall,
        "client_cpu_s": time.process_time() - cpu0,
        "max_submit_lateness_s": max(lateness, default=0.0),
    }
    return [records[i] for i in sorted(records)], costs
