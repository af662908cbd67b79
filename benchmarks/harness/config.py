"""The sweep's settings: one dataclass, filled from ``quantad bench`` flags or by tests."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

WORKLOADS = ("heavy-tail", "agents", "uniform", "agents-chat")
PEERS = ("transformers", "llama-server")  # `transformers serve --continuous-batching`; llama.cpp's llama-server


@dataclass
class BenchConfig:
    workload: str = "heavy-tail"
    policies: list[str] = field(default_factory=lambda: ["fifo", "rr"])
    quanta: list[float] = field(default_factory=lambda: [25.0, 100.0, 400.0, 1600.0, math.inf])  # ms; inf = FIFO
    requests: int = 40
    rate: float = 1.0  # open loop: requests per second
    burstiness: float = 1.0  # coefficient of variation of inter-arrival gaps (1: Poisson; >1: bursty gamma)
    seed: int = 0
    model: str = "smollm2"
    out: str = "bench-results"
    endpoint: str | None = None  # a running daemon: one point, its own policy and quantum
    slots: int = 4
    workers: int = 1
    peer: list[str] | bool = field(default_factory=lambda: ["transformers"])  # peers by name (True/False: old form)
    min_tokens: str = "max"  # "max": min_tokens = max_tokens (exact lengths); "0": free; N: min(N, max_tokens)
    short_tokens: tuple[int, int] = (8, 32)
    long_tokens: tuple[int, int] = (200, 400)
    long_fraction: float = 0.1
    uniform_tokens: tuple[int, int] = (16, 128)
    long_threshold: int = 100  # planned output tokens from which a request counts as "long"
    prompt_words: int = 40  # median prompt length in words (lognormal)
    agents: int = 4  # agents workload: agents; open loop: client ids requests are spread over
    greedy_agents: int | None = None  # agents workload: greedy ones (default: half)
    greedy_parallel: int = 2  # concurrent loops of each greedy agent
    think_s: float = 0.5  # agents: mean think time before a call (polite agents)
    tool_s: float = 0.3  # agents: mean tool wait after a call
    preamble_words: int = 220  # agents-chat: the framework's shared system preamble (a few hundred tokens)
    temperature: float = 0.0
    warmup: int = 1  # untimed requests per server before each point
    timeout_s: float = 1800.0  # per point
    serve_args: list[str] = field(default_factory=list)  # extra `quantad serve` flags
    progress: bool = True

    def __post_init__(self) -> None:
        self.peer = parse_peers(self.peer)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quanta"] = [quantum_label(q) for q in self.quanta]
        return d


def quantum_label(q: float) -> str:
    return "inf" if math.isinf(q) else f"{q:g}"


def parse_peers(value: str | bool | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"transformers,llama-server"`` -> both, in that order; True -> ``["transformers"]``; False, "" -> none."""
    if value is None or value is False:
        return []
    if value is True:
        return ["transformers"]
    names = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for name in (n.strip().lower() for n in names):
        if not name:
            continue
        if name not in PEERS:
            raise ValueError(f"--peer: unknown peer {name!r} (known: {', '.join(PEERS)})")
        if name not in out:
            out.append(name)
    return out


def parse_quanta(text: str) -> list[float]:
    """``"25,100,inf"`` -> ``[25.0, 100.0, inf]`` (milliseconds)."""
    out = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        q = math.inf if part in ("inf", "infinity", "fifo") else float(part)
        if q <= 0:
            raise ValueError(f"a quantum must be positive: {part!r}")
        out.append(q)
    if not out:
        raise ValueError("no quanta given")
    return out


def parse_range(text: str) -> tuple[int, int]:
    """``"8,32"`` -> ``(8, 32)``; ``"16"`` -> ``(16, 16)``."""
    parts = [int(p) for p in text.split(",") if p.strip()]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise ValueError(f"not a token range LO,HI: {text!r}")
    return parts[0], parts[1]
