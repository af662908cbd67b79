"""Switch cost per tier on the llama.cpp engine: a 512-token sequence of the default GGUF through each tier.

* device: the sequence stays in llama.cpp's cache; suspending and resuming it is bookkeeping (no byte moves);
* host: ``llama_state_seq_get_data`` out (and the cells freed), ``set_data`` back in, against libc's
  memcpy of the same bytes out and back (one thread, as llama.cpp copies; torch's ``copy_``, which
  splits a large copy between the threads, is shown beside it);
* disk: the host form written as a checksummed snapshot file and read back through the
  ``ContextManager``, against a raw write + fsync + read of the same bytes.

All in this process, each round timing every tier and both baselines (one thread of llama.cpp is
enough: these are copies), under the allocator settings a worker runs with (``MALLOC_ENV``).
``python -m benchmarks.llama_switch [--quick]``.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import shutil
import sys
import tempfile
import time

import torch

from backends.llama_model import LlamaModel
from backends.llamacpp_engine import Slot
from backends.model_store import default_gguf
from benchmarks.common import median, table
from benchmarks.context_switch import memcpy_roundtrip
from benchmarks.switch_costs import _file_roundtrip
from contexts.manager import ContextManager
from contexts.snapshot import Snapshot
from ipc.protocol import TIER_DEVICE, TIER_DISK, TIER_HOST
from scheduler.workers import MALLOC_ENV

_BUFFERS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _buffers(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two buffers of the state's size, allocated and touched once: the memcpy baseline pays no page faults."""
    if like.numel() not in _BUFFERS:
        _BUFFERS[like.numel()] = (like.clone(), like.clone())
    return _BUFFERS[like.numel()]


def _memmove_roundtrip(src: torch.Tensor, mid: torch.Tensor, dst: torch.Tensor) -> float:
    """libc's memcpy (``ctypes.memmove``) out and back: one thread, as llama.cpp copies a state."""
    n = src.numel()
    t0 = time.perf_counter()
    ctypes.memmove(mid.data_ptr(), src.data_ptr(), n)
    ctypes.memmove(dst.data_ptr(), mid.data_ptr(), n)
    return time.perf_counter() - t0


def _round(m: LlamaModel, cm: ContextManager, tokens: int, tmp: str) -> dict[str, float]:
    out: dict[str, float] = {}
    slot = Slot(m, m.acquire())
    m.decode([(slot.sid, 0, [100 + i % 1000 for i in range(tokens)])])
    slot.tokens = tokens
    logits = torch.zeros(1, m.n_vocab)
    t0 = time.perf_counter()  # device: snapshot in place, restore
    cm.snapshot(1, Snapshot(layers=slot, logits=logits, meta=None))
    back = cm.restore(1)
    out["device"] = time.perf_counter() - t0
    assert back.layers is slot and back.tier == TIER_DEVICE
    t0 = time.perf_counter()  # host: evict (get_data, cells freed), restore, set_data
    cm.snapshot(1, Snapshot(layers=slot, logits=logits, meta=None))
    cm.demote(1, TIER_HOST)
    back = cm.restore(1)
    ((data, _),) = back.layers
    sid = m.acquire()
    m.set_state(sid, data, tokens)
    out["host"] = time.perf_counter() - t0
    assert back.tier == TIER_HOST
    mid, dst = _buffers(data)
    out["memcpy"] = _memmove_roundtrip(data, mid, dst)
    out["torch_copy"] = memcpy_roundtrip([data], [mid], [dst])
    slot = Slot(m, sid, tokens)
    cm.snapshot(1, Snapshot(layers=slot.evict(), logits=logits, meta=None, tokens=tokens))
    t0 = time.perf_counter()  # disk: the host form to a file and back
    cm.demote(1, TIER_DISK)
    landed = cm.tier_of(1)
    back = cm.restore(1)
    out["disk"] = time.perf_counter() - t0
    assert landed == TIER_DISK and torch.equal(back.layers[0][0], data)
    out["file"] = _file_roundtrip([data], [torch.empty_like(data)], f"{tmp}/raw")
    out["nbytes"] = data.numel()
    return out


def measure(tokens: int = 512, repeats: int = 8) -> dict[str, list[float]]:
    m = LlamaModel(str(default_gguf()), slots=1, ctx_size=4096, threads=1)
    tmp = tempfile.mkdtemp(prefix="qd-llama-switch-")
    cm = ContextManager(torch.device("cpu"), 1 << 30, 1 << 30, disk_budget=1 << 30, state_dir=f"{tmp}/state")
    rounds: dict[str, list[float]] = collections.defaultdict(list)
    try:
        for _ in range(repeats + 1):
            for k, v in _round(m, cm, tokens, tmp).items():
                rounds[k].append(v)
        assert m.cells_in_use() == 0
    finally:
        m.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {k: v[1:] for k, v in rounds.items()}  # the first round pays one-off setup


def report(r: dict[str, list[float]], tokens: int) -> str:
    med = {k: median(v) for k, v in r.items()}
    mib = med["nbytes"] / (1 << 20)

    def row(name: str, key: str, base: str | None) -> tuple[str, ...]:
        ratio = "-" if base is None else f"**{med[base] / med[key]:.2f}**"
        return name, f"{1e3 * med[key]:.3f}", "-" if key == "device" else f"{2 * mib / med[key] / 1024:.1f}", ratio

    rows = [
        row("device: stays in llama.cpp's cache (no copy)", "device", None),
        row("host: get_data out + set_data in", "host", "memcpy"),
        row("memcpy out and back, one thread (baseline)", "memcpy", None),
        row("torch copy_ out and back, every thread (for comparison)", "torch_copy", None),
        row("disk: snapshot file written, fsynced, read", "disk", "file"),
        row("raw write + fsync + read (baseline)", "file", None),
    ]
    head = f"{tokens}-token sequence, {mib:.2f} MiB of state bytes, median of {len(r['host'])} rounds"
    return head + "\n\n" + table(["tier", "switch ms", "GiB/s", "vs baseline"], rows)


def _as_a_worker_allocates(argv: list[str]) -> None:
    """Re-run this process under the workers' allocator settings (``MALLOC_ENV``), which glibc reads at start.

    A worker keeps freed state buffers in its heap, so an eviction writes into pages already
    mapped; measured without them, each eviction would also pay 11 MiB of fresh page faults
    that no worker pays.
    """
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    env = {**os.environ, **MALLOC_ENV}
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.llama_switch", *argv], env)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _as_a_worker_allocates(argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llama_switch", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds instead of 8")
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args(argv)
    print(report(measure(args.tokens, 3 if args.quick else 8), args.tokens))


if __name__ == "__main__":
    main()
