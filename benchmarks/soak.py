"""Soak: bad input, floods, mass cancels and a disconnect with thousands queued, beside real requests.

``python -m benchmarks.soak [--frames N] [--queued N]`` starts a daemon on the default model
(4 slots, loopback ``ipc://`` only) and, while a prober pings it back to back (the loop's lag
is the ping's round trip), runs four phases:

* ``malformed``: N frames (default 100,000) of 18 kinds (raw garbage, truncated msgpack,
  oversized strings, wrong types, unknown ops, ...) from several connections, while greedy
  chats run beside them; each chat's text must equal its run on the idle daemon;
* ``flood``: one connection submits N chats (default 3,000) as fast as it can;
* ``mass cancel``: it cancels all of them;
* ``disconnect``: another connection submits N chats and closes without waiting.

It prints a table: per phase the frames sent, the ping p50/p99/max, and whether every
well-formed request was correct; and the daemon's RSS before and after.  Bounded in count
and time; nothing here asserts (the tests do).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time

import msgpack
import psutil
import zmq

from benchmarks.common import table
from ipc.client import Client
from ipc.launcher import DaemonProcess

KINDS = 18


def bad_frame(i: int, rng: random.Random) -> list[bytes]:
    """Frame ``i`` of one of 18 kinds of bad input."""
    k = i % KINDS
    good = msgpack.packb({"v": 1, "op": "chat", "id": i, "messages": [{"role": "user", "content": "hi"}]})
    choices = {
        0: lambda: [rng.randbytes(rng.randint(1, 64))],
        1: lambda: [good[: rng.randint(1, len(good) - 1)]],  # truncated
        2: lambda: [msgpack.packb({"v": 1, "op": "x" * 100_000, "id": i})],  # oversized op
        3: lambda: [msgpack.packb({"v": 1, "op": "chat", "id": i, "messages": "x" * 50_000})],
        4: lambda: [msgpack.packb([1, 2, 3])],  # not a map
        5: lambda: [msgpack.packb({"v": 2, "op": "ping", "id": i})],  # wrong version
        6: lambda: [msgpack.packb({"v": 1, "op": "nope", "id": i})],
        7: lambda: [msgpack.packb({"v": 1, "op": "kill", "id": i, "pid": "one"})],
        8: lambda: [msgpack.packb({"v": 1, "op": "nice", "id": i, "pid": 10**30 % 2**63, "nice": 99})],
        9: lambda: [good, good],  # two frames
        10: lambda: [b""],
        11: lambda: [msgpack.packb({"v": 1, "op": "chat", "id": i, "messages": [{"role": 5, "content": []}]})],
        12: lambda: [msgpack.packb({"v": 1, "op": "chat", "id": i, "messages": [], "max_tokens": -1})],
        13: lambda: [
            msgpack.packb(
                {
                    "v": 1,
                    "op": "chat",
                    "id": i,
                    "messages": [{"role": "user", "content": "x"}],
                    "response_format": {"type": "json_schema", "json_schema": "x"},
                }
            )
        ],
        14: lambda: [msgpack.packb({"v": 1, "op": "chat", "id": [1, {2: 3}], "messages": []})],
        15: lambda: [
            msgpack.packb(
                {
                    "v": 1,
                    "op": "chat",
                    "id": i,
                    "messages": [{"role": "user", "content": "x"}],
                    "tool_choice": {"function": "x"},
                }
            )
        ],
        16: lambda: [msgpack.packb({"v": 1, "op": "ps", "id": i, "extra": list(range(1000))})],
        17: lambda: [msgpack.packb({"v": 1, "op": "cancel", "id": 2**63 - 1})],
    }
    return choices[k]()


class Prober(threading.Thread):
    """Pings back to back; each round trip is one sample of the loop's lag."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.endpoint, self.samples, self.stop = endpoint, [], threading.Event()

    def run(self) -> None:
        with Client(self.endpoint, timeout=30) as c:
            while not self.stop.is_set():
                t = time.perf_counter()
                c.ping(timeout=30)
                self.samples.append(time.perf_counter() - t)
                time.sleep(0.005)

    def take(self) -> list[float]:
        out, self.samples = self.samples, []
        return out


def greedy_texts(endpoint: str, n: int) -> list[str]:
    with Client(endpoint, timeout=300) as c:
        cids = [
            c.submit([{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=12, temperature=0.0)
            for i in range(n)
        ]
        return [[e for e in c.events(cid)][-1].text or "?" for cid in cids]


def malformed(endpoint: str, frames: int, reference: list[str]) -> tuple[int, bool]:
    rng, ctx = random.Random(0), zmq.Context()
    socks = []
    for _ in range(8):
        s = ctx.socket(zmq.DEALER)
        s.linger, s.sndhwm, s.rcvhwm = 0, 0, 0
        s.connect(endpoint)
        socks.append(s)
    result: list[list[str]] = []
    beside = threading.Thread(target=lambda: result.append(greedy_texts(endpoint, len(reference))))
    beside.start()
    sent = 0
    for i in range(frames):
        s = socks[i % len(socks)]
        s.send_multipart(bad_frame(i, rng))
        sent += 1
        while s.poll(0):
            s.recv_multipart()
    beside.join()
    ctx.destroy(0)
    return sent, bool(result) and result[0] == reference


def flood_and_cancel(endpoint: str, n: int) -> tuple[float, float]:
    with Client(endpoint, timeout=300) as c:
        t = time.perf_counter()
        cids = [c.submit([{"role": "user", "content": f"flood {i}"}], max_tokens=64) for i in range(n)]
        for cid in cids:
            c.recv(cid)  # accepted
        flood_s = time.perf_counter() - t
        t = time.perf_counter()
        for cid in cids:
            c.send({"op": "cancel", "id": cid})
        for cid in cids:
            while c.recv(cid)["event"] not in ("cancelled", "done", "error"):
                pass
        return flood_s, time.perf_counter() - t


def disconnect(endpoint: str, n: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    for i in range(n):
        s.send(
            msgpack.packb(
                {"v": 1, "op": "chat", "id": i, "messages": [{"role": "user", "content": "x"}], "max_tokens": 64}
            )
        )
    s.recv()  # the first answer: the daemon has them
    ctx.destroy(0)  # gone, with thousands queued: the daemon learns it at its next send


def mib(proc: psutil.Process) -> str:
    return f"{proc.memory_info().rss / 2**20:.1f}"


def lag(samples: list[float]) -> list[str]:
    if not samples:
        return ["-", "-", "-"]
    q = statistics.quantiles(samples, n=100, method="inclusive") if len(samples) > 1 else [samples[0]] * 99
    return [f"{q[49] * 1000:.1f}", f"{q[98] * 1000:.1f}", f"{max(samples) * 1000:.1f}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--queued", type=int, default=3000)
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args(argv)
    with DaemonProcess("--model", args.model, "--slots", "4") as d:
        d.wait_ready()
        proc = psutil.Process(d.proc.pid)
        reference = greedy_texts(d.endpoint, 8)
        rss0 = proc.memory_info().rss
        prober = Prober(d.endpoint)
        prober.start()
        rows = []
        sent, ok = malformed(d.endpoint, args.frames, reference)
        rows.append(["malformed", str(sent), *lag(prober.take()), "yes" if ok else "NO", mib(proc)])
        flood_s, cancel_s = flood_and_cancel(d.endpoint, args.queued)
        rows.append(
            [
                f"flood ({flood_s:.2f} s) + mass cancel ({cancel_s:.2f} s)",
                str(2 * args.queued),
                *lag(prober.take()),
                "-",
                mib(proc),
            ]
        )
        disconnect(d.endpoint, args.queued)
        with Client(d.endpoint, timeout=300) as c:  # the daemon tries to answer them, finds the agent gone
            while c.call("stats")["requests"]["READY"] > 0:
                time.sleep(0.05)
        rows.append(["disconnect with queued", str(args.queued), *lag(prober.take()), "-", mib(proc)])
        after = greedy_texts(d.endpoint, 8)
        prober.stop.set()
        prober.join()
        rss1 = proc.memory_info().rss
        alive = d.proc.poll() is None
    head = ["phase", "frames", "ping p50 ms", "ping p99 ms", "ping max ms", "well-formed correct", "daemon RSS MiB"]
    print(table(head, rows))
    print(
        f"\ndaemon RSS {rss0 / 2**20:.1f} MiB before, {rss1 / 2**20:.1f} MiB after; alive: {alive}; "
        f"outputs after the soak equal those before it: {after == reference}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
