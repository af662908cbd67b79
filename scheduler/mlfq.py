"""Multi-level feedback queue with skip-join, after FastServe (Wu et al., 2023).

Short jobs finish fast without knowing job lengths in advance: every request starts high
and sinks one level each time it uses up a whole time slice, and a lower level gets a longer
slice (doubled per level) so long jobs switch less.  A long prompt skips the levels
whose slice could not even cover its prefill.  A periodic boost lifts every request back
to the top so that a stream of short jobs cannot starve the long ones.

A level's slice is counted here in base quanta: the worker checks in at every base quantum,
and the request goes on unless a request of a higher level waits (it takes the slot at once,
as a higher-priority process does in an OS) or its slice is over.  Handing the worker the whole
slice instead (base x 2**level) left a short job that arrived behind a level-4 job waiting up to
16 base quanta for its first token (p99 TTFT 6.3 s against round robin's 0.9 s, measured).
"""

from __future__ import annotations

from typing import Any

from scheduler.policy import Policy, Quantum
from scheduler.request import Request


class Mlfq(Policy):
    """Options: ``levels`` (queues, 0 = highest), ``prefill_tokens`` (prompt tokens that one base
    quantum is taken to cover: a prompt of p tokens joins the first level k with p <= prefill_tokens * 2**k),
    ``boost_quanta`` (every that many base quanta used, all live requests go back to level 0; 0 = never)."""

    name = "mlfq"

    def __init__(
        self, quantum: Quantum, levels: int = 5, prefill_tokens: int = 256, boost_quanta: int = 100, **opts: Any
    ):
        super().__init__(quantum, **opts)
        if levels < 1 or prefill_tokens < 1 or boost_quanta < 0:
            raise ValueError("mlfq needs levels >= 1, prefill_tokens >= 1, boost_quanta >= 0")
        self.levels, self.prefill_tokens, self.boost_quanta = levels, prefill_tokens, boost_quanta
        self.level: dict[int, int] = {}  # pid -> current level
        self.entry: dict[int, int] = {}  # pid -> level it joined at (skip-join)
        self.demotions: dict[int, int] = {}
        self.used: dict[int, int] = {}  # pid -> base quanta used of its slice at its level
        self.slice_over: set[int] = set()  # requests whose slice ran out at their last check-in
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

    def slice_quanta(self, req: Request) -> int:
        """The time slice of the request's level, in base quanta."""
        return 1 << self.level.get(req.pid, 0)

    def quantum_used(self, req: Request) -> None:
        k = self.level.get(req.pid, 0)
        used = self.used.get(req.pid, 0) + 1
        self.slice_over.discard(req.pid)
        if used >= 1 << k:  # the level's slice is over: one level down (the bottom one is round robin)
            used = 0
            self.slice_over.add(req.pid)
            if k < self.levels - 1:
                self.level[req.pid] = k + 1
                self.demotions[req.pid] = self.demotions.get(req.pid, 0) + 1
        self.used[req.pid] = used
        self.quanta_seen += 1
        if self.boost_quanta and self.quanta_seen % self.boost_quanta == 0:
            self.boosts += 1
            for pid in self.live:
                self.level[pid], self.used[pid] = 0, 0

    def may_preempt(self, running: Request, waiting: Request) -> bool:
        """A higher level takes the slot at any check-in; the same level only once the slice is over."""
        ahead = self.priority(waiting) < self.priority(running)
        return ahead or (running.pid in self.slice_over and self.priority(waiting) <= self.priority(running))

    def release(self, req: Request) -> None:
        for table in (self.level, self.entry, self.demotions, self.live, self.used):
            table.pop(req.pid, None)
        self.slice_over.discard(req.pid)

    def priority(self, req: Request) -> tuple:
        return (self.level.get(req.pid, 0), req.nice)

    def info(self, req: Request) -> dict[str, Any]:
        level = self.level.get(req.pid, 0)
        return super().info(req) | {
            "priority": level,
            "level": level,
            "entry_level": self.entry.get(req.pid, 0),
            "demotions": self.demotions.get(req.pid, 0),
        }
