"""Context switch cost: snapshot + restore of a real SmolLM2 KV cache through ``ContextManager``.

Why: a preemptive scheduler is only worth it if switching is cheap.  The device tier should
cost microseconds whatever the context length (the tensors stay where they are, nothing is
copied); the host tier copies the KV out and back, so it should run near memory bandwidth.
The baseline is a bare ``dst.copy_(src)`` of the same tensors into preallocated buffers, out
and back: the same two copies with no bookkeeping and no allocation.  Host-tier and memcpy
repetitions alternate so background load hits both alike; medians are reported.

After the switches, the next logits must equal those of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass

import torch

from backends.hf_model import HFModel
from benchmarks.common import greedy, like_a_worker, load_engine, log, median, parse_ints, prompt_ids, table
from contexts.kv import build_cache, cache_layers
from contexts.manager import ContextManager
from contexts.snapshot import Snapshot
from ipc.protocol import TIER_DEVICE, TIER_HOST

HUGE = 1 << 50  # a budget that never fills


@dataclass
class SwitchResult:
    tokens: int
    nbytes: int
    device_s: float  # median snapshot+restore, device tier
    host_s: float  # median snapshot+restore, host tier (two copies)
    memcpy_s: float  # median of the same two copies into preallocated tensors
    host_faults: float  # median minor page faults per host-tier switch (fresh memory being touched)
    ratio: float  # median over rounds of memcpy time / host-tier time (each pair measured back to back)
    exact: bool  # next logits after all switches == uninterrupted run

    @property
    def host_gbps(self) -> float:
        return 2 * self.nbytes / self.host_s / 1e9

    @property
    def memcpy_gbps(self) -> float:
        return 2 * self.nbytes / self.memcpy_s / 1e9


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def switch_once(cm: ContextManager, snap: Snapshot, tier: str) -> tuple[Snapshot, float, int]:
    """One preemption and resume, timed: snapshot, check the tier it landed in, restore."""
    f0 = _minor_faults()
    t0 = time.perf_counter()
    cm.snapshot(0, snap)
    landed = cm.tier_of(0)
    back = cm.restore(0)
    dt = time.perf_counter() - t0
    faults = _minor_faults() - f0
    assert landed == tier, f"snapshot landed in tier {landed!r}, expected {tier!r}"
    return back, dt, faults


def memcpy_roundtrip(src: list[torch.Tensor], mid: list[torch.Tensor], dst: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for s, m in zip(src, mid, strict=True):
        m.copy_(s)
    for m, d in zip(mid, dst, strict=True):
        d.copy_(m)
    return time.perf_counter() - t0


@torch.inference_mode()
def measure(engine: HFModel, n_tokens: int, repeats: int) -> SwitchResult:
    cache, logits = engine.prefill(prompt_ids(engine, n_tokens))
    # The state at the preemption point, kept apart from the cache the reference run goes on with.
    layers = [(k.clone(), v.clone()) for k, v in cache_layers(cache)]
    last = logits.clone()
    token = greedy(logits)
    reference = engine.decode(cache, token)  # the uninterrupted run's next logits
    del cache

    snap = Snapshot(layers=layers, logits=last, meta=None)
    nbytes = snap.nbytes

    # (a) device tier: suspended in place; restore must hand back the very same tensors.
    device_cm = ContextManager(engine.device, device_budget=HUGE, host_budget=HUGE)
    ptrs = [t.data_ptr() for t in snap.tensors()]
    device_times = []
    for _ in range(repeats + 1):
        snap, dt, _ = switch_once(device_cm, snap, TIER_DEVICE)
        device_times.append(dt)
    assert [t.data_ptr() for t in snap.tensors()] == ptrs, "device tier copied the tensors"

    # (b) host tier (device_budget=0 forces the copy out) vs the same two copies, preallocated.
    host_cm = ContextManager(engine.device, device_budget=0, host_budget=HUGE)
    src = snap.tensors()
    mid = [torch.empty_like(t, device="cpu") for t in src]
    dst = [torch.empty_like(t) for t in src]
    host_times, copy_times, faults = [], [], []
    for _ in range(repeats + 1):  # the first round of each warms up and is dropped
        snap, dt, nf = switch_once(host_cm, snap, TIER_HOST)
        host_times.append(dt)
        faults.append(nf)
        copy_times.append(memcpy_roundtrip(src, mid, dst))
    assert snap.nbytes == nbytes

    resumed = build_cache(snap.layers, engine.config)
    exact = torch.equal(snap.logits, last) and token == greedy(snap.logits)
    exact = exact and torch.equal(engine.decode(resumed, token), reference)
    assert exact, f"{n_tokens} tokens: logits after {2 * repeats + 2} switches differ from an uninterrupted run"
    return SwitchResult(
        tokens=n_tokens,
        nbytes=nbytes,
        device_s=median(device_times[1:]),
        host_s=median(host_times[1:]),
        memcpy_s=median(copy_times[1:]),
        host_faults=median(faults[1:]),
        ratio=median([c / h for c, h in zip(copy_times[1:], host_times[1:], strict=True)]),
        exact=exact,
    )


def run(engine: HFModel, sizes: list[int], repeats: int) -> str:
    results = []
    for n in sizes:
        log(f"context switch: {n} tokens x {repeats} repeats")
        results.append(measure(engine, n, repeats))
    rows = [
        (
            r.tokens,
            f"{r.nbytes / 2**20:.2f}",
            f"{r.device_s * 1e6:.1f}",
            f"{r.host_s * 1e3:.2f}",
            f"{r.memcpy_s * 1e3:.2f}",
            f"{r.host_gbps:.1f}",
            f"{r.memcpy_gbps:.1f}",
            f"**{r.ratio:.2f}**",
            f"{r.host_faults:.0f}",
            "yes" if r.exact else "NO",
        )
        for r in results
    ]
    headers = (
        "context tokens",
        "snapshot MiB",
        "device tier µs",
        "host tier ms",
        "memcpy ms",
        "host GB/s",
        "memcpy GB/s",
        "host / memcpy",
        "host page faults",
        "logits exact",
    )
    return (
        f"### Context switch (snapshot + restore, median of {repeats})\n\n"
        + table(headers, rows)
        + "\n\nGB/s counts both copies (out and back).  host / memcpy: median over rounds of the bandwidth ratio, "
        "each round timing both back to back.  Target: host / memcpy >= 0.8; device tier O(1).  "
        "Host page faults: minor faults per host-tier switch (fresh pages touched by the copies; "
        "the memcpy baseline, into preallocated tensors, takes none)."
    )


def main(argv: list[str] | None = None) -> int:
    like_a_worker("benchmarks.context_switch")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sizes", type=parse_ints, default=[128, 512, 1024], help="context lengths, e.g. 128,512,1024")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    print(run(load_engine(args.model), args.sizes, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
