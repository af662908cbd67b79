"""Shared helpers: the model loaded once, deterministic prompts, CPU-contention gauges, Markdown tables."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from backends.hf_model import HFModel
from backends.model_store import resolve

# Prose to tokenize into long prompts: realistic token statistics, fully deterministic.
_PARAGRAPH = (
    "An operating system shares one processor among many programs by giving each a short time "
    "slice. When the slice runs out, the scheduler saves the registers of the running program, "
    "picks the next one from the run queue and restores its registers, so every program makes "
    "progress and none can hold the processor forever. A language model serving many agents "
    "faces the same problem: each request holds a cache of keys and values that grows with "
    "every token, and switching between requests means saving and restoring that cache. "
)


def like_a_worker(module: str) -> None:
    """Re-run this benchmark with the malloc settings the daemon gives its workers, so
    in-process context switches are measured as a worker would do them."""
    import os

    from scheduler.workers import MALLOC_ENV, worker_env

    if any(k not in os.environ for k in MALLOC_ENV):
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], worker_env())


def log(msg: str) -> None:
    """Progress on stderr, so stdout holds only the tables."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def load_engine(model: str = "smollm2") -> HFModel:
    """Load the model and run one warm-up pass: the first forward pays one-off initialisation (seconds)."""
    t0 = time.perf_counter()
    engine = HFModel(str(resolve(model)))
    cache, logits = engine.prefill(prompt_ids(engine, 64))
    engine.decode(cache, int(torch.argmax(logits[0])))
    log(f"model loaded and warmed up in {time.perf_counter() - t0:.1f} s ({torch.get_num_threads()} threads)")
    return engine


def prompt_ids(engine: HFModel, n: int) -> list[int]:
    """Exactly ``n`` token ids of plain prose (no chat template), the same on every run."""
    per_paragraph = len(engine.tokenizer(_PARAGRAPH)["input_ids"])
    ids = engine.tokenizer(_PARAGRAPH * (n // per_paragraph + 1))["input_ids"]
    return list(ids[:n])


def greedy(logits: torch.Tensor) -> int:
    """Greedy choice, as ``backends.sampling.choose`` does with temperature 0."""
    return int(torch.argmax(logits.reshape(-1)))


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table, columns padded for reading in a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _psi_cpu_some() -> dict[str, float] | None:
    """Linux PSI for the CPU, "some" line: avg10/avg60/avg300 in %, total stall in microseconds."""
    try:
        with open("/proc/pressure/cpu") as f:
            return {k: float(v) for k, v in (kv.split("=") for kv in f.readline().split()[1:])}
    except (OSError, ValueError):
        return None


def cpu_pressure(window: str = "avg60") -> float | None:
    """% of the last 10/60/300 s in which some runnable task waited for a CPU (a noise gauge)."""
    psi = _psi_cpu_some()
    return None if psi is None else psi.get(window)


def pressure_text() -> str:
    p = cpu_pressure()
    return "n/a" if p is None else f"{p:.0f}%"


def psi_stall_s() -> float | None:
    """Cumulative seconds in which some task waited for a CPU (PSI "some" total), or None off Linux."""
    psi = _psi_cpu_some()
    return None if psi is None else psi["total"] / 1e6


def stall_share(since: float | None, wall_s: float) -> float | None:
    """Share of the last ``wall_s`` seconds in which some task waited for a CPU, given ``psi_stall_s()`` then."""
    now = psi_stall_s()
    return None if since is None or now is None or wall_s <= 0 else (now - since) / wall_s


def with_pressure(fn: Callable[[], str]) -> str:
    """Run a benchmark and append the share of its wall time some task waited for a CPU (ours included)."""
    since, t0 = psi_stall_s(), time.monotonic()
    text = fn()
    share = stall_share(since, time.monotonic() - t0)
    if share is None:
        return text
    return text + f"\n\nCPU pressure during this benchmark (PSI some, our own processes included): {share:.0%}."


def wait_for_quiet(max_wait_s: float, threshold: float = 10.0) -> None:
    """On a shared machine, wait (up to ``max_wait_s``) until others leave the CPU mostly idle."""
    deadline = time.monotonic() + max_wait_s
    while (p := cpu_pressure("avg10")) is not None and p > threshold and time.monotonic() < deadline:
        log(f"CPU pressure {p:.0f}% over the last 10 s: waiting for a quieter moment")
        time.sleep(10.0)


def parse_ints(text: str) -> list[int]:
    """``"128,512,1024"`` -> ``[128, 512, 1024]``."""
    return [int(x) for x in text.split(",") if x.strip()]
