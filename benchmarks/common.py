"""Shared helpers: the model loaded once, deterministic prompts and chats, CPU-contention gauges,
Markdown tables and the run header, and real daemons as subprocesses (started, timed, stopped, checked)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backends.hf_model import HFModel
from backends.model_store import resolve
from ipc.client import AsyncClient, ChatResult
from ipc.launcher import DaemonProcess

REPO = Path(__file__).resolve().parent.parent

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


# ---- run header, parts, flags -------------------------------------------------------------------
def print_header(title: str, prog: str, argv: list[str] | None, machine_note: str = "") -> None:
    """The date, the command, the machine and the CPU pressure at the start of a run (stdout)."""
    print(f"## {title}\n")
    print(f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"- command: python -m {prog} {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}{machine_note}")  # fmt: skip
    print(f"- CPU pressure at start (PSI some avg60, share of time a task waited for a CPU): {pressure_text()}\n")


def print_footer(t0: float) -> None:
    """The CPU pressure at the end and the run's total time, ``t0`` from ``time.perf_counter()``."""
    print(f"- CPU pressure at end: {pressure_text()}; total {time.perf_counter() - t0:.0f} s")


def print_part(run: Callable[[], str], wait_quiet_s: float) -> None:
    """Wait for a quiet CPU (up to ``wait_quiet_s``), run one benchmark, print its tables and its pressure."""
    wait_for_quiet(wait_quiet_s)
    print(with_pressure(run) + "\n", flush=True)


def add_wait_quiet(ap: argparse.ArgumentParser, each: str) -> None:
    """The ``--wait-quiet S`` flag: before each ``each`` (a benchmark, a part), wait for an idle CPU."""
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help=f"before each {each}, wait up to S seconds for CPU pressure (PSI avg10) to fall under 10%%",
    )


# ---- prompts and chats --------------------------------------------------------------------------
# Open-ended prompts, so generations usually run to max_tokens rather than stopping early.
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a CPU cache works, with examples.",
    "Describe, step by step, how to bake bread at home.",
    "Write a detailed essay on the history of the printing press.",
    "Explain how a compiler turns source code into machine code.",
    "Write a long letter from a sailor to his family describing a storm at sea.",
    "Describe the water cycle in detail for a curious ten-year-old.",
    "Explain why the sky is blue and why sunsets are red, in detail.",
]


def chat_messages(i: int) -> list[dict[str, str]]:
    """Chat ``i`` of a run: the prompts in turn, marked as variants once they have all been used."""
    text = PROMPTS[i % len(PROMPTS)]
    if i >= len(PROMPTS):
        text += f" (variant {i // len(PROMPTS)})"
    return [{"role": "user", "content": text}]


@dataclass
class Pass:
    """One timed pass over the same N generations, bare or through the daemon."""

    kind: str
    outputs: list[list[int]]
    wall_s: float
    results: list[ChatResult] = field(default_factory=list)
    pressure: float | None = None  # share of the pass in which some task waited for a CPU (PSI)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.outputs)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall_s


async def daemon_pass(client: AsyncClient, n: int, max_tokens: int) -> Pass:
    """Chats ``0..n-1`` submitted at once, greedy, timed from the first submit to the last ``done``."""
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(client.chat(chat_messages(i), max_tokens=max_tokens, temperature=0) for i in range(n))
    )
    wall = time.perf_counter() - t0
    return Pass("daemon", [r.token_ids for r in results], wall, list(results))


# ---- daemons ------------------------------------------------------------------------------------
def worker_children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (a daemon's workers), from /proc."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    return kids


def _running(pid: int) -> bool:
    """True if ``pid`` is a live (not zombie) quantad worker; a reused pid is not ours to judge or kill."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            alive = f.read().rsplit(")", 1)[1].split()[0] != "Z"
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return alive and b"backends.worker" in f.read()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def leftover_workers(pids: list[int], grace_s: float = 5.0) -> list[int]:
    """The workers among ``pids`` still running ``grace_s`` after their daemon stopped."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _running(p)]


def serve_flags(policy: str, slots: int, quantum_ms: float | None = None) -> list[str]:
    """``quantad serve`` flags for a policy, a batch size and (for a preemptive policy) a quantum."""
    return ["--slots", str(slots), "--policy", policy, *(["--quantum-ms", f"{quantum_ms:g}"] if quantum_ms else [])]


_WARNING_MARKS = ("level=WARNING", "level=ERROR", "Traceback")


class Daemon(DaemonProcess):
    """``quantad serve FLAGS`` for a benchmark: ``ipc.launcher.DaemonProcess``, ready once it answers ``ping``.

    Its socket, state directory and log live in ``tmpdir``.  ``shutdown`` sends SIGTERM alone (as systemd
    would: the daemon drains) and records the exit code; then no worker of it may be left running (any that
    outlived it is listed in ``left`` and killed by its pid), and its log's warnings and errors (a lost worker
    among them) are in ``warnings``.
    """

    def __init__(self, name: str, flags: Sequence[str], tmpdir: str, model: str | None = None):
        self.name, self.flags = name, " ".join(flags)
        state = os.path.join(tmpdir, f"{name}-state")
        args = [*flags, *(["--model", model] if model else []), "--state-dir", state, "--log-level", "WARNING"]
        super().__init__(*args, endpoint=f"ipc://{tmpdir}/{name}.sock", env={"QUANTAD_RUNTIME_DIR": tmpdir},
                         log=os.path.join(tmpdir, f"{name}.log"), cwd=REPO)  # fmt: skip
        self.exit_code: int | None = None
        self.left: list[int] = []
        self.warnings: list[str] = []

    @property
    def workers_lost(self) -> int:
        return sum("event=worker_lost" in w for w in self.warnings)

    def shutdown(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (SIGKILL if it does not exit in ``timeout_s``); then check that its workers are gone."""
        workers = worker_children(self.proc.pid) if self.proc is not None else []
        self.exit_code = self.stop(timeout_s, cut=False)
        self.left = leftover_workers(workers)
        for pid in self.left:  # ended by its id, never by name
            os.kill(pid, signal.SIGKILL)
        self.warnings = [line for line in self.log().splitlines() if any(w in line for w in _WARNING_MARKS)]
        return self.exit_code


@contextlib.contextmanager
def serving(
    specs: dict[str, Sequence[str]], model: str | None = None, prefix: str = "qd-batch-"
) -> Iterator[dict[str, Daemon]]:
    """Start every daemon at once (the model loads overlap), wait until all are ready, stop all at the end."""
    tmpdir = tempfile.mkdtemp(prefix=prefix)
    daemons: dict[str, Daemon] = {}
    try:
        for name, flags in specs.items():
            log(f"starting quantad serve {' '.join(flags)}")
            daemons[name] = Daemon(name, flags, tmpdir, model)
            daemons[name].spawn()
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
