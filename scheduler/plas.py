"""Program-level attained service, after Autellix (Luo et al., 2025).

An agent calls the model many times in one program.  Ranking single calls (as MLFQ does)
lets a program with a long chain of short calls look short forever; ranking programs by
the service all their calls received so far puts a long chain behind programs that have
had little.  A program is the request's session when it has one, else its agent, else the
conversation it continues (``scheduler.programs``: plain OpenAI clients name none).  The
attained service is discretised into levels (least attained first, round robin inside a
level), and halved every ``decay_quanta`` quantum ends, as 4.3BSD decays CPU usage, so a
heavy program that waits rises again instead of starving.

A prompt counts as service for what the worker computed of it: a conversation resent with
its state cached costs only its new turn.
"""

from __future__ import annotations

from typing import Any

from scheduler.policy import Policy, Quantum, nice_weight
from scheduler.request import Request


class Plas(Policy):
    """Options: ``levels`` (queues), ``base`` (service units of level 0: a program with attained service
    a < base is at level 0, else at 1 + floor(log2(a / base)), capped), ``decay_quanta`` (0 = never)."""

    name = "plas"

    def __init__(self, quantum: Quantum, levels: int = 8, base: float = 64.0, decay_quanta: int = 100, **opts: Any):
        super().__init__(quantum, **opts)
        if levels < 1 or base <= 0 or decay_quanta < 0:
            raise ValueError("plas needs levels >= 1, base > 0, decay_quanta >= 0")
        self.levels, self.base, self.decay_quanta = levels, float(base), decay_quanta
        self.attained: dict[str, float] = {}
        self.quanta_seen = 0

    def level_of(self, attained: float) -> int:
        k, bound = 0, self.base
        while k < self.levels - 1 and attained >= bound:
            k += 1
            bound *= 2
        return k

    def service(self, req: Request) -> float:
        """Generated tokens, and the prompt once its worker said how much of it was computed (a quantum's end)."""
        computed = req.prompt_tokens - req.prompt_reused if req.quanta else 0
        return self.input_weight * computed + self.output_weight * req.generated

    def level(self, req: Request) -> int:
        """Its program's level now."""
        return self.level_of(self.attained.get(req.program_key, 0.0))

    def account(self, req: Request, delta: float) -> None:
        prog = req.program_key
        self.attained[prog] = self.attained.get(prog, 0.0) + delta / nice_weight(req.nice)

    def quantum_used(self, req: Request) -> None:
        self.quanta_seen += 1
        if self.decay_quanta and self.quanta_seen % self.decay_quanta == 0:
            self.attained = {p: a / 2 for p, a in self.attained.items() if a >= 1.0}

    def priority(self, req: Request) -> tuple:
        return (self.level(req), req.nice)

    def info(self, req: Request) -> dict[str, Any]:
        attained = self.attained.get(req.program_key, 0.0)
        level = self.level_of(attained)
        return super().info(req) | {
            "priority": level,
            "level": level,
            "program": req.program,
            "attained": round(attained, 3),
        }
