"""Crash soak, journal cost and recovery time: what the journal (``scheduler.journal``) costs and buys.

* soak: several agents stream requests while the daemon is SIGKILLed at random moments and
  restarted on the same state directory each time; every request must end ``done`` with its
  text equal to an uncrashed greedy run's, its token indexes each seen once, none missing;
* cost: daemon tokens/s at 16 slots with the journal and with ``--no-journal``, one run,
  and the journal's own write time as a share of the daemon's CPU time;
* recovery: 100 unfinished requests in a dead daemon's journal: the time to read them back,
  and from the new daemon's start until every one is queued or running again.

``python -m benchmarks.crash_soak [--model smollm2] [--requests 200] [--kills 30] [--quick]``
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil

from benchmarks.common import Daemon, chat_messages, log, print_footer, print_header, table
from ipc import events as E
from ipc import protocol as P
from ipc.client import Client

SOAK_FLAGS = ["--slots", "4", "--quantum-tokens", "4", "--journal-keep-s", "3600"]


def _params(i: int, tokens: int) -> dict:
    n = tokens + 8 * (i % 3)
    return {"max_tokens": n, "min_tokens": n, "temperature": 0.0}


@dataclass
class Soak:
    requests: int = 0
    done: int = 0
    wrong: list[str] = field(default_factory=list)
    kills: int = 0
    restarts_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def _one(c: Client, i: int, tokens: int) -> tuple[str, str, int, int]:
    """A request's assembled text, its done text, its token count and the ids it was sent."""
    cid = c.submit(chat_messages(i % 8), stream=True, **_params(i, tokens))
    text, last, ids = "", 0, 0
    for ev in c.events(cid):
        if isinstance(ev, E.Token):
            index = ev.index or 0
            if index <= last:
                return "", f"token index {ev.index} after {last}", 0, 0
            last, text, ids = index, text + ev.text, ids + len(ev.token_ids)
        elif ev.terminal:
            return text, ev.text if isinstance(ev, E.Done) else f"{ev.event}: {ev.data}", last, ids
    return text, "no terminal event", last, ids


def soak(model: str | None, tmpdir: str, requests: int, kills: int, agents: int = 4, tokens: int = 24,
         seed: int = 7, flags: list[str] | None = None) -> Soak:  # fmt: skip
    """Kill the daemon ``kills`` times (at least) while ``agents`` threads run ``requests`` requests."""
    d = Daemon("soak", flags or SOAK_FLAGS, tmpdir, model)
    d.start(600)
    out, rng, lock = Soak(requests), random.Random(seed), threading.Lock()
    with d.client(timeout=600) as c:  # the reference: the same requests, no crash
        want = {k: c.chat(chat_messages(k % 8), **_params(k, tokens)).text for k in range(24)}
    finished = threading.Event()
    t0 = time.monotonic()

    def agent(a: int) -> None:
        with Client(d.endpoint, agent=f"agent{a}", dead_after_s=300) as c:
            for i in range(a, requests, agents):
                text, final, last, ids = _one(c, i, tokens)
                n = _params(i, tokens)["max_tokens"]
                ok = text == final == want[i % 24] and last == n and ids == n
                with lock:
                    out.done += ok
                    if not ok:
                        out.wrong.append(f"request {i}: {final!r:.120}")

    def killer() -> None:
        while not finished.is_set():
            time.sleep(rng.uniform(0.1, 0.6))  # a random moment of the stream (not a synchronisation)
            if finished.is_set():
                return
            os.kill(d.proc.pid, signal.SIGKILL)
            d.proc.wait()
            out.kills += 1
            r0 = time.monotonic()
            d.start(600)
            out.restarts_s.append(time.monotonic() - r0)
            if out.kills >= kills and rng.random() < 0.5:
                return

    k = threading.Thread(target=killer)
    k.start()
    with ThreadPoolExecutor(agents) as pool:
        list(pool.map(agent, range(agents)))
    finished.set()
    k.join()
    out.wall_s = time.monotonic() - t0
    d.shutdown()
    return out


def cost(model: str | None, tmpdir: str, n: int, tokens: int) -> dict[str, dict]:
    """tokens/s at 16 slots with and without the journal (both daemons up, run one after the other, twice)."""
    res: dict[str, dict] = {}
    daemons = {name: Daemon(name, ["--slots", "16", *extra], tmpdir, model)
               for name, extra in (("journal", []), ("no-journal", ["--no-journal"]))}  # fmt: skip
    for d in daemons.values():
        d.spawn()
    try:
        for d in daemons.values():
            d.wait_ready(600)
        for _ in range(2):  # alternate, so drift on this noisy machine hits both
            for name, d in daemons.items():
                proc = psutil.Process(d.proc.pid)
                cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
                with ThreadPoolExecutor(16) as pool, d.client(timeout=600) as c:
                    got = list(pool.map(lambda i, d=d: _usage(d, i, tokens), range(n)))
                    stats = c.stats()
                wall, cpu = time.monotonic() - t0, sum(proc.cpu_times()[:2]) - cpu0
                r = res.setdefault(name, {"tokens": 0, "wall": 0.0, "cpu": 0.0})
                r["tokens"] += sum(u["completion_tokens"] for u in got)
                r["wall"] += wall
                r["cpu"] += cpu
                r["journal"] = stats.get("journal")
        return res
    finally:
        for d in daemons.values():
            d.shutdown()


def _usage(d: Daemon, i: int, tokens: int) -> dict:
    with d.client(timeout=600) as c:
        return c.chat(chat_messages(i), max_tokens=tokens, min_tokens=tokens, temperature=0.0).usage


def recovery(model: str | None, tmpdir: str, n: int = 100) -> tuple[float, float, float]:
    """Read-back ms of ``n`` unfinished requests, and the new daemon's start-to-all-requeued seconds."""
    d = Daemon("recovery", ["--slots", "4", "--journal-keep-s", "3600"], tmpdir, model)
    d.start(600)
    with d.client(timeout=60) as c:
        for i in range(n):
            c.submit(chat_messages(i), max_tokens=200, min_tokens=200, temperature=0.0)
        while len(c.ps()["requests"]) < n:
            time.sleep(0.05)
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    t0 = time.monotonic()
    d.spawn()
    with d.client(timeout=600) as c:
        while len(c.call(P.OP_PS, 600)["requests"]) < n:
            time.sleep(0.01)
        back_s = time.monotonic() - t0
        d.wait_ready(600)
        ready_s = time.monotonic() - t0
        j = c.stats()["journal"]
    d.shutdown()
    return 1e3 * j["recovery_s"], back_s, ready_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.crash_soak", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded smollm2)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="fewer requests and kills (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.kills = 40, 5
    print_header("Crash soak, journal cost, recovery", "benchmarks.crash_soak", argv)
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="qd-crash-")
    log("soak")
    s = soak(args.model, tmp, args.requests, args.kills)
    print(table(["requests", "correct", "kills", "median restart s", "wall s", "wrong"],
                [(s.requests, s.done, s.kills, f"{sorted(s.restarts_s)[len(s.restarts_s) // 2]:.2f}",
                  f"{s.wall_s:.1f}", "; ".join(s.wrong[:3]) or "-")]))  # fmt: skip
    log("journal cost")
    c = cost(args.model, tmp, 32 if not args.quick else 16, 64 if not args.quick else 16)
    rows = []
    for name, r in c.items():
        busy = (r["journal"] or {}).get("busy_s", 0.0)
        rows.append((name, f"{r['tokens'] / r['wall']:.1f}", f"{r['cpu']:.2f}", f"{busy:.4f}",
                     f"{100 * busy / max(r['cpu'], 1e-9):.2f}%", (r["journal"] or {}).get("commits", "-")))  # fmt: skip
    ratio = (c["journal"]["tokens"] / c["journal"]["wall"]) / (c["no-journal"]["tokens"] / c["no-journal"]["wall"])
    print(table(["daemon", "tokens/s", "daemon CPU s", "journal s", "journal / CPU", "commits"], rows))
    print(f"\njournal / no journal tokens/s: **{ratio:.3f}**")
    log("recovery")
    read_ms, back_s, ready_s = recovery(args.model, tmp)
    print(table(["unfinished", "journal read ms", "start to all re-queued s", "start to ready s"],
                [(100, f"{read_ms:.1f}", f"{back_s:.2f}", f"{ready_s:.2f}")]))  # fmt: skip
    print_footer(t0)
    return 0 if s.done == s.requests and s.kills >= args.kills else 1


if __name__ == "__main__":
    raise SystemExit(main())
