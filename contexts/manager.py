"""The context manager: snapshot, restore, discard and stats over byte-budgeted tiers.

A preempted context first stays where it is (device tier: suspended in place, no copy).
When the device budget is exceeded, the least recently used snapshots are copied down to
host memory (pinned on CUDA).  When the host budget is exceeded too, each one leaving host
memory goes to disk (a safetensors file in ``state_dir``) or drops its KV and keeps only
token ids (recompute tier: the backend re-prefills on resume), whichever the cost model
says resumes faster.  The disk tier has a budget of its own, counted in real file sizes;
its least recently used files make room by dropping to recompute.  Without ``state_dir``
there is no disk tier and host memory spills straight to recompute.

An engine that keeps contexts in memory of its own (llama.cpp's KV cache) hands in a
``contexts.resident.Resident`` as the device-tier snapshot's layers: moving it down evicts it
(the engine copies it out and frees its cells), and the engine asks for room with ``evict_device``.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from contexts import disk, pressure
from contexts.cost import CostModel
from contexts.kv import copy_to
from contexts.reaper import Reaper
from contexts.snapshot import Snapshot
from ipc.protocol import TIER_DEVICE, TIER_DISK, TIER_HOST, TIER_RECOMPUTE, TIERS
from ipc.worker_spec import WorkerSpec

log = logging.getLogger("quantad.contexts")


@dataclass
class Move:
    """A snapshot changed tier (reported to the scheduler for ``ps``)."""

    key: int
    tier: str
    nbytes: int


class ContextManager:
    def __init__(
        self,
        device: torch.device,
        device_budget: int,
        host_budget: int,
        *,
        disk_budget: int = WorkerSpec.disk_budget,
        state_dir: str | None = None,
        cost: CostModel | None = None,
    ):
        self.device = torch.device(device)
        self.device_budget = device_budget
        self.host_budget = host_budget
        self.state_dir = state_dir
        self.disk_budget = disk_budget if state_dir is not None else 0
        self.cost = cost if cost is not None else CostModel()
        self.pin = self.device.type == "cuda"
        self._snaps: dict[int, Snapshot] = {}
        self._clock = itertools.count()
        self.switch_s = 0.0
        self.moves = 0
        self.decisions = {TIER_DISK: 0, TIER_RECOMPUTE: 0}
        self.corrupt_fallbacks = 0
        self.disk_errors = 0
        if state_dir is not None:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            if n := disk.clean(state_dir):
                log.info("removed %d stale context files from %s", n, state_dir)
        self.reaper = Reaper(state_dir) if state_dir is not None else None
        self.orphans: dict[int, str] = {}  # key -> ident: disk snapshots an earlier process left, for adoption
        if state_dir is not None:
            self._take_orphans(disk.orphans(state_dir))

    def _take_orphans(self, found: list[disk.Orphan]) -> None:
        """Files left by a dead worker join the disk tier while its budget holds; the rest are removed."""
        for o in found:
            if self.used(TIER_DISK) + o.file.nbytes > self.disk_budget:
                log.info("context %s: no room in the disk budget for %s", o.key, o.file.path)
                disk.remove(o.file.path)
                continue
            snap = Snapshot(None, None, None, tier=TIER_DISK, tokens=o.tokens, file=o.file, ident=o.ident)
            self._snaps[o.key], self.orphans[o.key] = snap, o.ident
        if self.orphans:
            log.info("adopting %d context files from %s", len(self.orphans), self.state_dir)

    def __contains__(self, key: int) -> bool:
        return key in self._snaps

    def tier_of(self, key: int) -> str:
        return self._snaps[key].tier

    def snapshot(self, key: int, snap: Snapshot) -> list[Move]:
        """Suspend a context in place, then push older ones down until budgets hold."""
        self.discard(key)  # a stale snapshot under the same key must not leak its file
        snap.tier, snap.last_used = TIER_DEVICE, next(self._clock)
        self._snaps[key] = snap
        return self._enforce()

    def restore(self, key: int) -> Snapshot:
        """Take a snapshot back, its tensors on the device (recompute tier: none)."""
        snap = self._snaps.pop(key)
        self.orphans.pop(key, None)
        t0 = time.perf_counter()
        if snap.tier == TIER_HOST:
            self._relocate(snap, self.device, pin=False, copy=False)
        elif snap.tier == TIER_DISK:
            self._load(key, snap)
        self.switch_s += time.perf_counter() - t0
        return snap

    def discard(self, key: int) -> None:
        snap = self._snaps.pop(key, None)
        self.orphans.pop(key, None)
        if snap is None:
            return
        if snap.resident:
            snap.layers.free()
        if snap.file is not None:
            self._delete(snap.file.path)

    def evict_device(self, enough: Callable[[], bool]) -> list[Move]:
        """Move device-tier snapshots down, least recently used first, until ``enough()`` (the engine's room)."""
        moves = []
        for key in self._lru(TIER_DEVICE):
            if enough():
                break
            moves += self._move(key, TIER_HOST)
        return moves + self._enforce() if moves else moves

    def _delete(self, path: str) -> None:
        """A snapshot file is gone from the state directory on return; its space is freed off this path."""
        if self.reaper is not None:
            self.reaper.discard(path)
        else:
            disk.remove(path)

    def demote(self, key: int, tier: str) -> list[Move]:
        """Move one snapshot down to ``tier`` now (tests, benchmarks), then restore the budgets.

        Raises ``ValueError`` for a tier that is not lower, or a disk tier that is off or too small.
        """
        snap = self._snaps[key]
        if tier not in TIERS or TIERS.index(tier) <= TIERS.index(snap.tier):
            raise ValueError(f"cannot demote from {snap.tier!r} to {tier!r}")
        if tier == TIER_DISK and self.disk_budget <= 0:
            raise ValueError("no disk tier: no state_dir or a zero disk budget")
        return self._move(key, tier, forced=True) + self._enforce()

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """The backend reports each prefill, so recompute costs follow this machine."""
        self.cost.observe_prefill(tokens, seconds)

    def used(self, tier: str) -> int:
        return sum(s.nbytes for s in self._snaps.values() if s.tier == tier)

    def stats(self) -> dict:
        by_tier = {t: {"count": 0, "bytes": 0} for t in TIERS}
        for s in self._snaps.values():
            by_tier[s.tier]["count"] += 1
            by_tier[s.tier]["bytes"] += s.nbytes
        return {
            "tiers": by_tier,
            "device_budget": self.device_budget,
            "host_budget": self.host_budget,
            "disk_budget": self.disk_budget,
            "moves": self.moves,
            "switch_s": round(self.switch_s, 6),
            "cost_model": self.cost.as_dict(),
            "decisions": dict(self.decisions),
            "corrupt_fallbacks": self.corrupt_fallbacks,
            "disk_errors": self.disk_errors,
            "orphans": len(self.orphans),
        }

    # ---- moving down ----------------------------------------------------------------------
    def _enforce(self) -> list[Move]:
        moves = []
        for tier, budget in ((TIER_DEVICE, self.device_budget), (TIER_HOST, self.host_budget)):
            budget = self._under_pressure(tier, budget)
            for key in self._lru(tier):
                if self.used(tier) <= budget:
                    break
                moves += self._move(key, TIER_HOST if tier == TIER_DEVICE else self._choose(self._snaps[key]))
        for key in self._lru(TIER_DISK):  # only if a file came out larger than encoded: never expected
            if self.used(TIER_DISK) <= self.disk_budget:
                break
            moves += self._move(key, TIER_RECOMPUTE)
        return moves

    def _under_pressure(self, tier: str, budget: int) -> int:
        """The budget, lowered to what the machine can still give (psutil, torch.cuda)."""
        on_device = tier == TIER_DEVICE and self.device.type == "cuda"
        free = pressure.device_free(self.device) if on_device else pressure.host_free()
        return pressure.effective(budget, self.used(tier), free)

    def _lru(self, tier: str) -> list[int]:
        return [k for _, k in sorted((s.last_used, k) for k, s in self._snaps.items() if s.tier == tier)]

    def _choose(self, snap: Snapshot) -> str:
        """Where a snapshot leaving host memory goes: the cheaper of swap and recompute."""
        if self.disk_budget <= 0 or snap.layers is None:
            return TIER_RECOMPUTE
        tier = TIER_DISK if self.cost.prefer_disk(snap.nbytes, snap.tokens) else TIER_RECOMPUTE
        self.decisions[tier] += 1
        return tier

    def _move(self, key: int, tier: str, forced: bool = False) -> list[Move]:
        snap = self._snaps[key]
        moves = []
        t0 = time.perf_counter()
        if tier == TIER_HOST:
            if snap.resident:
                snap.layers = snap.layers.evict()
            else:
                self._relocate(snap, torch.device("cpu"), pin=self.pin)
            snap.tier = TIER_HOST
        elif tier == TIER_DISK:
            moves = self._to_disk(key, snap, forced)
        else:
            self._to_recompute(snap)
        self.switch_s += time.perf_counter() - t0
        self.moves += 1
        return [*moves, Move(key, snap.tier, snap.nbytes)]

    def _to_disk(self, key: int, snap: Snapshot, forced: bool) -> list[Move]:
        """Write the snapshot's file, first dropping older disk snapshots to recompute to make room.

        Falls to recompute instead when the file cannot fit or cannot be written (unless
        ``forced``, where not fitting is an error).
        """
        if snap.layers is None:
            self._to_recompute(snap)
            return []
        if snap.resident:
            snap.layers = snap.layers.evict()
        data, file = disk.encode(snap.layers, snap.logits, snap.tokens, snap.ident)
        victims = [k for k in self._lru(TIER_DISK) if forced or self._snaps[k].last_used < snap.last_used]
        need = self.used(TIER_DISK) + len(data) - self.disk_budget
        if len(data) > self.disk_budget or sum(self._snaps[k].nbytes for k in victims) < need:
            if forced:
                raise ValueError(f"a {len(data)}-byte file does not fit the {self.disk_budget}-byte disk budget")
            self._to_recompute(snap)
            return []
        moves = []
        for k in victims:
            if need <= 0:
                break
            need -= self._snaps[k].nbytes
            moves += self._move(k, TIER_RECOMPUTE)
        file.path = disk.path_for(self.state_dir, key)
        if self.reaper is not None:
            self.reaper.drain()  # files not yet unlinked still take disk space: the budget counts them
        try:
            t1 = time.perf_counter()
            file.nbytes, file.digest = disk.write_atomic(file.path, data)
            self.cost.observe_write(file.nbytes, time.perf_counter() - t1)
        except OSError as exc:
            log.warning("context %s: cannot write %s (%s): recompute tier instead", key, file.path, exc)
            self.disk_errors += 1
            self._to_recompute(snap)
            return moves
        snap.layers, snap.logits, snap.file, snap.tier = None, None, file, TIER_DISK
        return moves

    def _load(self, key: int, snap: Snapshot) -> None:
        """Read a disk snapshot back; an untrustworthy file means recompute, never wrong tensors."""
        file, snap.file = snap.file, None
        t0 = time.perf_counter()
        try:
            snap.layers, snap.logits = disk.read(file)
        except disk.CorruptSnapshot as exc:
            log.warning("context %s: %s unusable (%s): recomputing instead", key, file.path, exc)
            self.corrupt_fallbacks += 1
            self._to_recompute(snap)
            return
        finally:
            self._delete(file.path)
        self.cost.observe_read(file.nbytes, time.perf_counter() - t0)
        if self.device.type != "cpu":
            self._relocate(snap, self.device, pin=False)

    def _to_recompute(self, snap: Snapshot) -> None:
        if snap.resident:
            snap.layers.free()
        if snap.file is not None:
            self._delete(snap.file.path)
        snap.layers, snap.logits, snap.file, snap.tier = None, None, None, TIER_RECOMPUTE

    @staticmethod
    def _relocate(snap: Snapshot, device: torch.device, pin: bool, copy: bool = True) -> None:
        """Copy the snapshot's tensors to ``device``; a restore (``copy=False``) keeps them if they are there."""
        tensors = snap.tensors()
        if not copy and all(t.device == device for t in tensors):
            return  # the host tier's own tensors, restored on a CPU: the row takes them (joining copies them)
        flat = copy_to(tensors, device, pin)
        n = len(snap.layers)
        snap.layers = [(flat[2 * i], flat[2 * i + 1]) for i in range(n)]
        snap.logits = flat[2 * n] if len(flat) > 2 * n else None
