"""Switch cost per tier: the host and disk tiers of ``ContextManager`` against bare copies of the same bytes.

Do the host and disk tiers run near the speed of a bare memcpy and of a bare file write + fsync + read,
and where does the cost model put the crossover between swapping to disk and recomputing?  A real
SmolLM2 KV cache is snapshot and restored through each tier, in this process, each round timing both
tiers, both baselines, the disk tier's steps one by one and a prefill of the same tokens.

``python -m benchmarks.switch_costs [--quick]`` (also part of ``python -m benchmarks.batching``, run
there after the daemons stop).
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch

from backends.hf_model import HFModel
from benchmarks import suite
from benchmarks.common import Daemon, log, median, prompt_ids, table
from benchmarks.context_switch import HUGE, memcpy_roundtrip, switch_once
from contexts import disk as diskfile
from contexts.cost import CostModel
from contexts.manager import ContextManager
from contexts.snapshot import Snapshot
from ipc.protocol import TIER_DISK, TIER_HOST

MiB = float(1 << 20)


@dataclass(frozen=True)
class Settings:
    switch_tokens: int = 512
    switch_repeats: int = 8


QUICK = Settings(switch_repeats=3)


def daemons(s: Settings) -> dict[str, list[str]]:
    return {}  # all in this process


def _file_roundtrip(src: list[torch.Tensor], dst: list[torch.Tensor], path: str) -> float:
    """The floor for the disk tier: the same bytes written, fsynced and read back into preallocated memory."""
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for t in src:
            f.write(t.numpy().reshape(-1).view("uint8").data)
        os.fsync(f.fileno())
    with open(path, "rb", buffering=0) as f:
        for t in dst:
            f.readinto(t.numpy().reshape(-1).view("uint8").data)
    dt = time.perf_counter() - t0
    os.unlink(path)
    return dt


def _disk_switch(cm: ContextManager, snap: Snapshot) -> tuple[Snapshot, float]:
    """A preemption straight to disk (as ``--snapshot-tier disk`` does) and the resume, timed."""
    t0 = time.perf_counter()
    cm.snapshot(0, snap)
    cm.demote(0, TIER_DISK)
    landed = cm.tier_of(0)
    back = cm.restore(0)
    dt = time.perf_counter() - t0
    assert landed == TIER_DISK, f"snapshot landed in tier {landed!r}"
    return back, dt


def _disk_parts(snap: Snapshot, path: str) -> dict[str, float]:
    """Where the disk tier's time goes: the steps ``ContextManager`` takes, called one by one."""
    t0 = time.perf_counter()
    diskfile.checksum(snap.tensors())  # alone, for scale: write and read interleave it
    t1 = time.perf_counter()
    data, file = diskfile.encode(snap.layers, snap.logits, snap.tokens)
    t2 = time.perf_counter()
    file.path = path
    file.nbytes, file.digest = diskfile.write_atomic(path, data)
    t3 = time.perf_counter()
    diskfile.read(file)
    t4 = time.perf_counter()
    diskfile.remove(path)
    return {"checksum": t1 - t0, "encode": t2 - t1, "write": t3 - t2, "read": t4 - t3}


def crossover(cost: CostModel, bytes_per_token: float, fixed_bytes: int, limit: int = 1 << 24) -> int | None:
    """Smallest context (tokens) for which the cost model prefers swapping to disk over recomputing."""

    def disk(t: int) -> bool:
        return cost.prefer_disk(int(t * bytes_per_token) + fixed_bytes, t)

    if not disk(limit):
        return None
    lo, hi = 0, limit  # disk(lo) is False (or lo == 0), disk(hi) is True: both costs are linear in t
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if disk(mid) else (mid, hi)
    return hi


@dataclass
class Subject:
    """The context switched: a real KV cache's snapshot, its prompt, and buffers for the bare baselines."""

    ids: list[int]
    snap: Snapshot  # the latest restored copy: every round switches it on
    nbytes: int  # the snapshot's size: KV and last logits
    kv_bytes: int
    src: list[torch.Tensor]  # the snapshot's tensors as first taken (the exactness reference)
    mid: list[torch.Tensor]
    dst: list[torch.Tensor]

    @property
    def tokens(self) -> int:
        return len(self.ids)


@torch.inference_mode()
def subject(engine: HFModel, n: int) -> Subject:
    ids = prompt_ids(engine, n)
    engine.prefill(ids)  # untimed: the first pass at a new length pays one-off setup
    cache, logits = engine.prefill(ids)
    # contiguous copies, as a worker's snapshot is (a raw file write needs contiguous bytes)
    layers = [(layer.keys.contiguous().clone(), layer.values.contiguous().clone()) for layer in cache.layers]
    snap = Snapshot(layers=layers, logits=logits.clone(), meta=None)
    kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
    src = snap.tensors()
    assert all(t.is_contiguous() for t in src), "the raw file baseline writes and reads tensors in place"
    mid, dst = [torch.empty_like(t) for t in src], [torch.empty_like(t) for t in src]
    return Subject(ids, snap, snap.nbytes, kv_bytes, src, mid, dst)


def _round(engine: HFModel, x: Subject, host_cm: ContextManager, disk_cm: ContextManager, tmpdir: str,
           t: dict[str, list[float]]) -> None:  # fmt: skip
    """One round, back to back: host tier, memcpy, disk tier, raw file, the disk tier's steps, a prefill."""
    x.snap, dt, _ = switch_once(host_cm, x.snap, TIER_HOST)
    t["host"].append(dt)
    t["memcpy"].append(memcpy_roundtrip(x.src, x.mid, x.dst))
    x.snap, dt = _disk_switch(disk_cm, x.snap)
    t["disk"].append(dt)
    t["file"].append(_file_roundtrip(x.src, x.dst, os.path.join(tmpdir, "raw.bin")))
    for k, v in _disk_parts(x.snap, os.path.join(tmpdir, "parts.safetensors")).items():
        t[k].append(v)
    t0 = time.perf_counter()
    engine.prefill(x.ids)
    t["prefill"].append(time.perf_counter() - t0)
    disk_cm.observe_prefill(x.tokens, t["prefill"][-1])  # as the worker reports every prefill


@torch.inference_mode()
def measure(engine: HFModel, s: Settings) -> tuple[Subject, dict[str, list[float]], ContextManager]:
    """Every round's times by name (round 0 included), and the disk tier's manager (its cost model)."""
    x = subject(engine, s.switch_tokens)
    tmpdir = tempfile.mkdtemp(prefix="qd-batch-disk-")
    host_cm = ContextManager(engine.device, device_budget=0, host_budget=HUGE)
    disk_cm = ContextManager(engine.device, device_budget=HUGE, host_budget=HUGE, disk_budget=HUGE, state_dir=tmpdir)
    t: dict[str, list[float]] = collections.defaultdict(list)
    try:
        for r in range(s.switch_repeats + 1):  # round 0 warms up and is dropped
            log(f"switch cost: round {r}/{s.switch_repeats} ({x.tokens} tokens, {x.nbytes / MiB:.1f} MiB)")
            _round(engine, x, host_cm, disk_cm, tmpdir, t)
        # still exact after all the round trips
        assert all(torch.equal(a, b) for a, b in zip(x.snap.tensors(), x.src, strict=True)), (
            "a round trip changed bytes"
        )
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return x, t, disk_cm


def _tier_rows(t: dict[str, list[float]], med: dict[str, float], nbytes: int) -> list[tuple[str, ...]]:
    def ratio(base: str, tier: str) -> float:
        return median([b / x for b, x in zip(t[base][1:], t[tier][1:], strict=True)])

    per_mib = {k: 1e3 * med[k] / (nbytes / MiB) for k in ("host", "memcpy", "disk", "file")}
    return [
        ("host tier (device_budget=0)", f"{1e3 * med['host']:.1f}", f"{per_mib['host']:.2f}", "memcpy",
         f"{per_mib['memcpy']:.2f}", f"**{ratio('memcpy', 'host'):.2f}**"),
        ("disk tier (demote to disk)", f"{1e3 * med['disk']:.1f}", f"{per_mib['disk']:.2f}",
         "file write+fsync+read", f"{per_mib['file']:.2f}", f"**{ratio('file', 'disk'):.2f}**"),
    ]  # fmt: skip


def _facts(x: Subject, med: dict[str, float], disk_cm: ContextManager) -> list[tuple[str, str]]:
    n, nbytes, kv_bytes = x.tokens, x.nbytes, x.kv_bytes
    cm = disk_cm.stats()["cost_model"]
    per_token_s = med["prefill"] / n
    cross = crossover(disk_cm.cost, kv_bytes / n, nbytes - kv_bytes)
    return [
        ("snapshot size", f"{nbytes / MiB:.2f} MiB ({kv_bytes / n / 1024:.1f} KiB of KV per token + "
                          f"{(nbytes - kv_bytes) / 1024:.0f} KiB of logits)"),
        (f"recompute: prefill of {n} tokens", f"{1e3 * med['prefill']:.0f} ms = {1e3 * per_token_s:.2f} ms/token"),
        (f"disk round trip / recompute, {n} tokens", f"{med['disk'] / med['prefill']:.3f}"),
        (f"host round trip / recompute, {n} tokens", f"{med['host'] / med['prefill']:.4f}"),
        ("cost model estimates (stats()['cost_model'])",
         f"write {cm['write_Bps'] / 1e9:.2f} GB/s, read {cm['read_Bps'] / 1e9:.2f} GB/s, "
         f"prefill {cm['prefill_tps']:.0f} tokens/s"),
        ("**cost model: swap to disk cheaper than recompute from**",
         f"**{cross} tokens**" if cross else "never (recompute always cheaper)"),
        ("disk tier decisions / corrupt fallbacks / disk errors",
         f"{disk_cm.decisions} / {disk_cm.corrupt_fallbacks} / {disk_cm.disk_errors}"),
    ]  # fmt: skip


def _disk_steps(med: dict[str, float]) -> list[tuple[str, str]]:
    return [
        ("encode: safetensors header (the checksum is left for the writer)", f"{1e3 * med['encode']:.1f}"),
        ("write_atomic: xxh3 + write, tensor by tensor; header patch, fsync, rename", f"{1e3 * med['write']:.1f}"),
        ("read: validation; readinto + xxh3, tensor by tensor", f"{1e3 * med['read']:.1f}"),
        ("(one xxh3 pass over the whole snapshot alone, for scale)", f"{1e3 * med['checksum']:.1f}"),
        ("raw file write + fsync + read of the same bytes (baseline)", f"{1e3 * med['file']:.1f}"),
    ]


def report(x: Subject, t: dict[str, list[float]], disk_cm: ContextManager, s: Settings) -> str:
    med = {k: median(v[1:]) for k, v in t.items()}
    headers = ("tier", "snapshot+restore ms", "ms / MiB", "baseline", "baseline ms / MiB", "baseline / tier")
    return (
        f"### 4. Switch cost per tier ({x.tokens}-token SmolLM2 KV cache, median of {s.switch_repeats})\n\n"
        + table(headers, _tier_rows(t, med, x.nbytes))
        + "\n\n"
        + table(("summary", "value"), _facts(x, med, disk_cm))
        + "\n\n"
        + table(("where the disk tier's time goes (``contexts.disk`` steps called one by one)", "ms"), _disk_steps(med))
        + "\n\nTarget: baseline / tier >= 0.8.  Baselines move the same bytes with nothing else: two ``copy_`` "
        "into preallocated tensors (out and back), and a raw write of the tensor bytes + fsync + ``readinto`` "
        "preallocated tensors, in the same directory.  The disk tier also encodes safetensors, checksums "
        "(xxh3) on write and on read, starts the disk's writeback every 4 MiB as it writes (``sync_file_range``: "
        "the baseline leaves it all to its fsync, which is why the tier can beat it) and renames atomically "
        "(no directory fsync: snapshots never outlive their process); a resumed file is unlinked in the "
        "background, and neither side times the unlink.  Each round times all four "
        "back to back, plus a prefill of the same tokens (fed to the cost model, as the worker does); ratios are "
        "medians of per-round ratios.  The crossover solves the cost model's linear estimates "
        "(``CostModel.prefer_disk``) for the context length."
    )


def run(engine: HFModel, daemons: dict[str, Daemon], s: Settings) -> str:
    return report(*measure(engine, s), s)


PART = suite.Part("switch", Settings(), QUICK, daemons, run)


def main(argv: list[str] | None = None) -> int:
    return suite.main("benchmarks.switch_costs", "quantad switch cost benchmark", [PART], argv,
                      __doc__.splitlines()[0], "3 rounds")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
