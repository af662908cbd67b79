"""Multi-level feedback queue with skip-join, after FastServe (Wu et al., 2023).

Short jobs finish fast without knowing job lengths in advance: every request starts high
and sinks one level each time it uses up a whole quantum, and a lower level gets a longer
quantum (doubled per level) so long jobs switch less.  A long prompt skips the levels
whose quantum could not even cover its prefill.  A periodic boost lifts every request back
to the top so that a stream of short jobs cannot starve the long ones.
"""

from __future__ import annotations

from typing import Any

from scheduler.policy import Policy, Quantum
from scheduler.request import Request


class Mlfq(Policy):
    """Options: ``levels`` (queues, 0 = highest), ``prefill_tokens`` (prompt tokens that one base
    quantum is taken to cover: a prompt of p tokens joins the first level k with p <= prefill_tokens * 2**k),
    ``boost_quanta`` (every that many quantum ends, all live requests go back to level 0; 0 = never)."""

    name = "mlfq"

    def __init__(self, quantum: Quantum, levels: int = 5, prefill_tokens: int = 256, boost_quanta: int = 100,
                 **opts: Any):  # fmt: skip
        super().__init__(quantum, **opts)
        if levels < 1 or prefill_tokens < 1 or boost_quanta < 0:
            raise ValueError("mlfq needs levels >= 1, prefill_tokens >= 1, boost_quanta >= 0")
        self.levels, self.prefill_tokens, self.boost_quanta = levels, prefill_tokens, boost_quanta
        self.level: dict[int, int] = {}  # pid -> current level
        self.entry: dict[int, int] = {}  # pid -> level it joined at (skip-join)
        self.demotions: dict[int, int] = {}
        self.live: dict[int, Request] = {}
        self.quanta_seen = 0
        self.boosts = 0

    def entry_level(self, prompt_tokens: int) -> int:
        """Skip-join: the highest level whose quantum covers this prompt's prefill."""
        k = 0
        while k < self.levels - 1 and prompt_tokens > self.prefill_tokens << k:
            k += 1
        return k

    def admit(self, req: Request) -> None:
        k = self.entry_level(req.prompt_tokens)
        self.level[req.pid] = self.entry[req.pid] = k
        self.demotions[req.pid] = 0
        self.live[req.pid] = req

    def quantum_for(self, req: Request) -> Quantum:
        return self.quantum.scaled(1 << self.level.get(req.pid, 0))

    def quantum_used(self, req: Request) -> None:
        k = self.level.get(req.pid, 0)
        if k < self.levels - 1:
            self.level[req.pid] = k + 1
            self.demotions[req.pid] = self.demotions.get(req.pid, 0) + 1
        self.quanta_seen += 1
        if self.boost_quanta and self.quanta_seen % self.boost_quanta == 0:
            self.boosts += 1
            for pid in self.live:
                self.level[pid] = 0

    def release(self, req: Request) -> None:
        for table in (self.level, self.entry, self.demotions, self.live):
            table.pop(req.pid, None)

    def priority(self, req: Request) -> tuple:
        return (self.level.get(req.pid, 0), req.nice)

    def info(self, req: Request) -> dict[str, Any]:
        level = self.level.get(req.pid, 0)
        return super().info(req) | {"priority": level, "level": level, "entry_level": self.entry.get(req.pid, 0),
                                    "demotions": self.demotions.get(req.pid, 0)}  # fmt: skip
