"""The context manager: snapshot, restore, discard and stats over byte-budgeted tiers.

A preempted context first stays where it is (device tier: suspended in place, no copy).
When the device budget is exceeded, the least recently used snapshots are copied down to
host memory (pinned on CUDA); when the host budget is exceeded too, their KV is dropped
and only token ids are kept (recompute tier: the backend re-prefills on resume).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from contexts.kv import copy_to
from contexts.snapshot import TIER_DEVICE, TIER_HOST, TIER_RECOMPUTE, Snapshot


@dataclass
class Move:
    """A snapshot changed tier (reported to the scheduler for ``ps``)."""

    key: int
    tier: str
    nbytes: int


class ContextManager:
    def __init__(self, device: torch.device, device_budget: int, host_budget: int):
        self.device = torch.device(device)
        self.device_budget = device_budget
        self.host_budget = host_budget
        self.pin = self.device.type == "cuda"
        self._snaps: dict[int, Snapshot] = {}
        self._clock = itertools.count()
        self.switch_s = 0.0
        self.moves = 0

    def __contains__(self, key: int) -> bool:
        return key in self._snaps

    def tier_of(self, key: int) -> str:
        return self._snaps[key].tier

    def snapshot(self, key: int, snap: Snapshot) -> list[Move]:
        """Suspend a context in place, then push older ones down until budgets hold."""
        snap.tier, snap.last_used = TIER_DEVICE, next(self._clock)
        self._snaps[key] = snap
        moves = self._enforce()
        return moves

    def restore(self, key: int) -> Snapshot:
        """Take a snapshot back, its tensors on the device (recompute tier: none)."""
        snap = self._snaps.pop(key)
        if snap.tier == TIER_HOST:
            t0 = time.perf_counter()
            self._relocate(snap, self.device, pin=False)
            self.switch_s += time.perf_counter() - t0
        return snap

    def discard(self, key: int) -> None:
        self._snaps.pop(key, None)

    def used(self, tier: str) -> int:
        return sum(s.nbytes for s in self._snaps.values() if s.tier == tier)

    def stats(self) -> dict:
        by_tier = {t: {"count": 0, "bytes": 0} for t in (TIER_DEVICE, TIER_HOST, TIER_RECOMPUTE)}
        for s in self._snaps.values():
            by_tier[s.tier]["count"] += 1
            by_tier[s.tier]["bytes"] += s.nbytes
        return {
            "tiers": by_tier,
            "device_budget": self.device_budget,
            "host_budget": self.host_budget,
            "moves": self.moves,
            "switch_s": round(self.switch_s, 6),
        }

    def _enforce(self) -> list[Move]:
        moves = []
        for tier, budget, demote in (
            (TIER_DEVICE, self.device_budget, self._to_host),
            (TIER_HOST, self.host_budget, self._to_recompute),
        ):
            lru = sorted((s.last_used, k) for k, s in self._snaps.items() if s.tier == tier)
            used = self.used(tier)
            for _, key in lru:
                if used <= budget:
                    break
                snap = self._snaps[key]
                used -= snap.nbytes
                demote(snap)
                self.moves += 1
                moves.append(Move(key, snap.tier, snap.nbytes))
        return moves

    def _to_host(self, snap: Snapshot) -> None:
        t0 = time.perf_counter()
        self._relocate(snap, torch.device("cpu"), pin=self.pin)
        self.switch_s += time.perf_counter() - t0
        snap.tier = TIER_HOST
        # A host snapshot over the host budget goes further down in the next pass.

    @staticmethod
    def _to_recompute(snap: Snapshot) -> None:
        snap.layers, snap.logits, snap.tier = None, None, TIER_RECOMPUTE

    @staticmethod
    def _relocate(snap: Snapshot, device: torch.device, pin: bool) -> None:
        flat = copy_to(snap.tensors(), device, pin)
        n = len(snap.layers)
        snap.layers = [(flat[2 * i], flat[2 * i + 1]) for i in range(n)]
        snap.logits = flat[2 * n] if len(flat) > 2 * n else None
