"""Migration: moving a 512-token context to another worker vs recomputing its prefix there.

The context takes the path a migration takes in the daemon: tensors to raw frames
(``contexts.wire``), a DEALER socket to a relaying ROUTER over ``ipc://`` (the daemon's
role, frames forwarded with ``copy=False``), a DEALER on the far side, frames back to
tensors, a cache rebuilt.  The alternative is prefilling the same tokens on the far side.

    python -m benchmarks.migration [--tokens 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import zmq

from benchmarks.common import load_engine, log, median, prompt_ids, table
from contexts.kv import build_cache, cache_layers
from contexts.wire import from_frames, to_frames
from ipc import protocol as P


def sockets(ctx: zmq.Context, path: str) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket]:
    relay = ctx.socket(zmq.ROUTER)
    relay.bind(f"ipc://{path}")
    ends = []
    for name in (b"src", b"dst"):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, name)
        s.connect(f"ipc://{path}")
        ends.append(s)
    for s in (*ends, relay):  # as the daemon's worker socket and the workers' sockets are set up
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDBUF, P.BULK_SOCKET_BUFFER)
        s.setsockopt(zmq.RCVBUF, P.BULK_SOCKET_BUFFER)
    ends[1].send(b"hello")  # let the relay learn the far end's routing id
    relay.recv_multipart()
    return relay, ends[0], ends[1]


def migrate_once(engine, layers, logits, relay, src, dst) -> tuple[float, list, torch.Tensor]:
    t0 = time.perf_counter()
    specs, frames = to_frames([t for kv in layers for t in kv] + [logits])
    src.send_multipart([P.pack({"op": "exported", "tensors": specs}), *frames], copy=False)
    got = relay.recv_multipart(copy=False)
    relay.send_multipart([b"dst", *got[1:]], copy=False)
    parts = dst.recv_multipart(copy=False)
    head = P.unpack(parts[0].bytes)
    tensors = from_frames(head["tensors"], parts[1:], engine.device)
    n = len(layers)
    cache = build_cache([(tensors[2 * i], tensors[2 * i + 1]) for i in range(n)], engine.config)
    return time.perf_counter() - t0, cache, tensors[-1]


def run(tokens: int, repeats: int) -> str:
    engine = load_engine()
    ids = prompt_ids(engine, tokens)
    cache, logits = engine.prefill(ids)
    layers = cache_layers(cache)
    nbytes = sum(t.numel() * t.element_size() for kv in layers for t in kv) + logits.numel() * 4
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory() as tmp:
        relay, src, dst = sockets(ctx, f"{tmp}/relay.sock")
        moves, recomputes = [], []
        for i in range(repeats):
            log(f"migration round {i + 1}/{repeats}")
            dt, moved_cache, moved_logits = migrate_once(engine, layers, logits, relay, src, dst)
            moves.append(dt)
            t0 = time.perf_counter()
            engine.prefill(ids)
            recomputes.append(time.perf_counter() - t0)
        # The migrated context continues exactly like the original one.
        assert torch.equal(moved_logits, logits)
        token = int(torch.argmax(logits))
        assert torch.equal(engine.decode(moved_cache, token), engine.decode(build_cache(layers, engine.config), token))
        for s in (relay, src, dst):
            s.close(0)
    ctx.term()
    move, recompute = median(moves), median(recomputes)
    rows = [
        ["context", f"{tokens} tokens, {nbytes / 2**20:.1f} MiB"],
        ["migrate (frames over ZeroMQ, relayed)", f"{move * 1000:.1f} ms ({nbytes / move / 1e9:.2f} GB/s)"],
        ["recompute (prefill on the far side)", f"{recompute * 1000:.0f} ms"],
        ["migrate / recompute", f"1/{recompute / move:.0f} (target at most 1/50)"],
    ]
    return f"### Migration vs recompute (SmolLM2, median of {repeats})\n\n" + table(["", "value"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(run(args.tokens, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
