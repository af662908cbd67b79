"""Migration: moving a 512-token context to another worker vs recomputing its prefix there.

The context takes the paths a migration takes in the daemon, each timed: tensors to raw frames
(``contexts.wire``), then

- **direct** (``ipc://`` workers, the default): the frames pushed from the exporting worker's
  socket to the importing worker's inbox (``backends.peer``: PUSH -> PULL, one hop), while the
  small ``exported`` / ``run`` messages go through the daemon's relaying ROUTER;
- **relayed** (workers without an inbox, e.g. a ``tcp://`` worker endpoint): the frames go
  DEALER -> relaying ROUTER -> DEALER, forwarded with ``copy=False`` (two hops);

then frames back to tensors and a cache rebuilt.  The alternative is prefilling the same tokens
on the far side.  All sockets have the daemon's and the workers' buffer sizes.

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


def _bulk(s: zmq.Socket) -> zmq.Socket:
    """Socket options as the daemon's worker socket and the workers' sockets have them."""
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDBUF, P.BULK_SOCKET_BUFFER)
    s.setsockopt(zmq.RCVBUF, P.BULK_SOCKET_BUFFER)
    return s


def sockets(ctx: zmq.Context, tmp: str) -> dict[str, zmq.Socket]:
    """The daemon's relay, the two workers' DEALERs, the importer's inbox and the exporter's push."""
    kinds = {"relay": zmq.ROUTER, "inbox": zmq.PULL, "push": zmq.PUSH}
    s = {name: _bulk(ctx.socket(kind)) for name, kind in kinds.items()}
    s["relay"].bind(f"ipc://{tmp}/relay.sock")
    s["inbox"].bind(f"ipc://{tmp}/inbox.sock")
    s["push"].connect(f"ipc://{tmp}/inbox.sock")
    for name in ("src", "dst"):
        s[name] = _bulk(ctx.socket(zmq.DEALER))
        s[name].setsockopt(zmq.IDENTITY, name.encode())
        s[name].connect(f"ipc://{tmp}/relay.sock")
    s["dst"].send(b"hello")  # let the relay learn the far end's routing id
    s["relay"].recv_multipart()
    return s


def migrate_once(engine, layers, logits, s: dict[str, zmq.Socket], direct: bool) -> tuple[float, list, torch.Tensor]:
    t0 = time.perf_counter()
    specs, frames = to_frames([t for kv in layers for t in kv] + [logits])
    head = P.pack({"op": "exported", "tensors": specs})
    if direct:  # frames to the inbox, the notice through the daemon
        s["push"].send_multipart([P.pack({"op": "context", "rid": 1, "tensors": specs}), *frames], copy=False)
        s["src"].send(head)
        got = s["relay"].recv_multipart(copy=False)
        s["relay"].send_multipart([b"dst", *got[1:]], copy=False)
        s["dst"].recv_multipart(copy=False)
        parts = s["inbox"].recv_multipart(copy=False)
    else:
        s["src"].send_multipart([head, *frames], copy=False)
        got = s["relay"].recv_multipart(copy=False)
        s["relay"].send_multipart([b"dst", *got[1:]], copy=False)
        parts = s["dst"].recv_multipart(copy=False)
    tensors = from_frames(P.unpack(parts[0].bytes)["tensors"], parts[1:], engine.device)
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
    times: dict[str, list[float]] = {"direct": [], "relayed": [], "recompute": []}
    with tempfile.TemporaryDirectory() as tmp:
        socks = sockets(ctx, tmp)
        for i in range(repeats):
            log(f"migration round {i + 1}/{repeats}")
            for way in ("direct", "relayed"):
                dt, moved_cache, moved_logits = migrate_once(engine, layers, logits, socks, way == "direct")
                times[way].append(dt)
                assert torch.equal(moved_logits, logits)  # the migrated context continues exactly
                token = int(torch.argmax(logits))
                ref = engine.decode(build_cache(layers, engine.config), token)
                assert torch.equal(engine.decode(moved_cache, token), ref)
            t0 = time.perf_counter()
            engine.prefill(ids)
            times["recompute"].append(time.perf_counter() - t0)
        for sock in socks.values():
            sock.close(0)
    ctx.term()
    med = {k: median(v) for k, v in times.items()}
    rows = [
        ["context", f"{tokens} tokens, {nbytes / 2**20:.1f} MiB"],
        ["**migrate, direct** (frames pushed worker to worker; notice via the daemon)",
         f"**{med['direct'] * 1000:.1f} ms** ({nbytes / med['direct'] / 1e9:.2f} GB/s)"],
        ["migrate, relayed (frames through the daemon: tcp:// workers)",
         f"{med['relayed'] * 1000:.1f} ms ({nbytes / med['relayed'] / 1e9:.2f} GB/s)"],
        ["recompute (prefill on the far side)", f"{med['recompute'] * 1000:.0f} ms"],
        ["**migrate direct / recompute**", f"**1/{med['recompute'] / med['direct']:.0f}** (target at most 1/50)"],
        ["migrate relayed / recompute", f"1/{med['recompute'] / med['relayed']:.0f}"],
    ]  # fmt: skip
    return (f"### Migration vs recompute (SmolLM2, median of {repeats}; each round times all three back to back)\n\n"
            + table(["", "value"], rows))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(run(args.tokens, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
