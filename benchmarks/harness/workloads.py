"""Seeded, reproducible workloads: what to send, when, and how long each answer must be.

A workload is plain data, generated up front from one ``random.Random(seed)``, so the same
flags give the same requests on every run and for every (policy, quantum) point.  Open-loop
workloads (``heavy-tail``, ``uniform``) are a list of calls with arrival times (Poisson, or a
gamma process for bursts).  ``agents`` is a set of AIOS-style loops: think, call the model,
wait for a tool, append its output to the conversation, call again.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from benchmarks.harness.config import BenchConfig

_WORDS = (
    "an operating system shares one processor among many programs by giving each a short time slice when the "
    "slice runs out the scheduler saves the registers of the running program picks the next one from the run "
    "queue and restores its registers so every program makes progress and none can hold the processor forever "
    "a language model serving many agents faces the same problem each request holds a cache of keys and values "
    "that grows with every token and switching between requests means saving and restoring that cache"
).split()


@dataclass(frozen=True)
class Call:
    """One model call: its prompt (the new user turn), length limits and timing."""

    idx: int
    agent: str
    session: str
    cls: str  # "short" or "long" (planned output length vs the long threshold)
    prompt: str
    max_tokens: int
    min_tokens: int
    arrival_s: float = 0.0  # open loop: planned submit time from the start of the run
    think_s: float = 0.0  # agents: pause before this call
    tool_s: float = 0.0  # agents: tool wait after it
    turn: int = 0
    system: str = ""  # agents-chat: the conversation's system message (its first call's is used)


@dataclass(frozen=True)
class Loop:
    """One agent loop: its calls run one after another in one growing conversation."""

    agent: str
    kind: str  # "greedy" or "polite"
    session: str
    calls: tuple[Call, ...]


@dataclass(frozen=True)
class Workload:
    name: str
    calls: tuple[Call, ...] = ()  # open loop
    loops: tuple[Loop, ...] = ()  # agents
    info: dict = field(default_factory=dict)

    @property
    def all_calls(self) -> list[Call]:
        return list(self.calls) + [c for lp in self.loops for c in lp.calls]

    @property
    def closed(self) -> bool:
        return bool(self.loops)


def make_workload(cfg: BenchConfig) -> Workload:
    rng = random.Random(cfg.seed)
    if cfg.workload == "agents":
        return _agents(cfg, rng)
    if cfg.workload == "agents-chat":
        return _agents_chat(cfg, rng)
    if cfg.workload in ("heavy-tail", "uniform"):
        return _open_loop(cfg, rng)
    raise ValueError(f"unknown workload {cfg.workload!r}")


def _text(rng: random.Random, words: int) -> str:
    start = rng.randrange(len(_WORDS))
    return " ".join(_WORDS[(start + i) % len(_WORDS)] for i in range(words))


def _prompt_words(cfg: BenchConfig, rng: random.Random) -> int:
    """Lognormal around the median, clipped: most prompts near it, a few several times longer."""
    n = int(round(cfg.prompt_words * math.exp(rng.gauss(0.0, 0.5))))
    return max(4, min(n, 8 * cfg.prompt_words))


def _min_tokens(cfg: BenchConfig, max_tokens: int) -> int:
    if cfg.min_tokens == "max":
        return max_tokens
    return min(int(cfg.min_tokens), max_tokens)


def _length(cfg: BenchConfig, rng: random.Random, long: bool | None = None) -> int:
    if cfg.workload == "uniform":
        return rng.randint(*cfg.uniform_tokens)
    if long is None:
        long = rng.random() < cfg.long_fraction
    return rng.randint(*(cfg.long_tokens if long else cfg.short_tokens))


def _cls(cfg: BenchConfig, max_tokens: int) -> str:
    return "long" if max_tokens >= cfg.long_threshold else "short"


def gaps(cfg: BenchConfig, rng: random.Random, n: int) -> list[float]:
    """Inter-arrival gaps with mean 1/rate and coefficient of variation ``burstiness`` (gamma)."""
    if cfg.rate <= 0 or math.isinf(cfg.rate):
        return [0.0] * n
    shape = 1.0 / (cfg.burstiness**2)
    return [rng.gammavariate(shape, 1.0 / (cfg.rate * shape)) for _ in range(n)]


def _open_loop(cfg: BenchConfig, rng: random.Random) -> Workload:
    calls, t = [], 0.0
    for i, gap in enumerate(gaps(cfg, rng, cfg.requests)):
        t = 0.0 if i == 0 else t + gap
        n = _length(cfg, rng)
        task = f"Request {i}. Continue this text for a while: "
        calls.append(
            Call(
                idx=i,
                agent=f"client{i % max(cfg.agents, 1)}",
                session="",
                cls=_cls(cfg, n),
                prompt=task + _text(rng, _prompt_words(cfg, rng)),
                max_tokens=n,
                min_tokens=_min_tokens(cfg, n),
                arrival_s=round(t, 6),
            )  # fmt: skip
        )
    info = {"kind": "open", "rate": cfg.rate, "burstiness": cfg.burstiness, "duration_s": round(t, 3)}
    return Workload(cfg.workload, calls=tuple(calls), info=info)


def _turn_prompt(cfg: BenchConfig, rng: random.Random, turn: int, opening: str) -> str:
    """An agent loop's new user turn: its task on the first, a tool's output after."""
    if turn == 0:
        return opening + _text(rng, _prompt_words(cfg, rng))
    return "Tool output: " + _text(rng, max(4, _prompt_words(cfg, rng) // 2)) + ". Continue the task."


def _wait(rng: random.Random, mean_s: float) -> float:
    """An exponential pause of mean ``mean_s`` (none when it is 0)."""
    return rng.expovariate(1.0 / mean_s) if mean_s > 0 else 0.0


def _agents(cfg: BenchConfig, rng: random.Random) -> Workload:
    """Greedy agents run several loops at once with long answers and no pauses; polite ones one loop of short calls."""
    k = max(cfg.agents, 1)
    greedy = k // 2 if cfg.greedy_agents is None else min(cfg.greedy_agents, k)
    heads = []  # (agent, kind, session)
    for a in range(k):
        kind = "greedy" if a < greedy else "polite"
        for p in range(cfg.greedy_parallel if kind == "greedy" else 1):
            heads.append((f"agent{a}", kind, f"agent{a}-loop{p}"))
    turns = [cfg.requests // len(heads) + (i < cfg.requests % len(heads)) for i in range(len(heads))]
    loops, idx = [], 0
    for (agent, kind, session), n_turns in zip(heads, turns, strict=True):
        calls = []
        for turn in range(n_turns):
            n = _length(cfg, rng, long=kind == "greedy")
            prompt = _turn_prompt(cfg, rng, turn, f"You are {agent}. Summarise and extend this text: ")
            think = 0.0 if kind == "greedy" else _wait(rng, cfg.think_s)
            tool = _wait(rng, cfg.tool_s)
            calls.append(Call(idx=idx, agent=agent, session=session, cls=_cls(cfg, n), prompt=prompt, max_tokens=n,
                              min_tokens=_min_tokens(cfg, n), think_s=round(think, 6), tool_s=round(tool, 6),
                              turn=turn))  # fmt: skip
            idx += 1
        if calls:
            loops.append(Loop(agent, kind, session, tuple(calls)))
    info = {"kind": "agents", "agents": k, "greedy_agents": greedy, "loops": len(loops)}
    return Workload(cfg.workload, loops=tuple(loops), info=info)


def _agents_chat(cfg: BenchConfig, rng: random.Random) -> Workload:
    """Agents as frameworks run them over an OpenAI API: each turn resends the whole conversation.

    Every agent's conversation opens with the framework's shared preamble (``preamble_words``) and
    its own task; each turn appends the model's answer and a tool's output.  ``greedy_agents`` of
    them (default: a quarter) give long answers, the rest short ones; ``tool_s`` is the mean tool
    wait between turns.  ``requests`` calls in all, spread evenly over the agents.
    """
    k = max(cfg.agents, 1)
    longs = k // 4 if cfg.greedy_agents is None else min(cfg.greedy_agents, k)
    preamble = "You are a careful agent of an agent framework. Follow the instructions. " + " ".join(
        _WORDS[i % len(_WORDS)] for i in range(cfg.preamble_words)
    )
    turns = [cfg.requests // k + (i < cfg.requests % k) for i in range(k)]
    loops, idx = [], 0
    for a, n_turns in enumerate(turns):
        kind, agent = ("greedy" if a < longs else "polite"), f"agent{a}"
        calls = []
        for turn in range(n_turns):
            n = _length(cfg, rng, long=kind == "greedy")
            prompt = _turn_prompt(cfg, rng, turn, f"Task {a}: study this and report: ")
            tool = _wait(rng, cfg.tool_s)
            calls.append(Call(idx=idx, agent=agent, session="", cls=_cls(cfg, n), prompt=prompt, max_tokens=n,
                              min_tokens=_min_tokens(cfg, n), tool_s=round(tool, 6), turn=turn,
                              system=preamble))  # fmt: skip
            idx += 1
        if calls:
            loops.append(Loop(agent, kind, "", tuple(calls)))
    info = {"kind": "agents-chat", "agents": k, "long_agents": longs, "loops": len(loops)}
    return Workload(cfg.workload, loops=tuple(loops), info=info)
