"""Fair share across agents with virtual token counters, after VTC (Sheng et al., OSDI 2024).

Each agent has a counter of the service its requests received (weighted prompt and output
tokens, divided by the request's nice weight).  A free slot goes to the backlogged agent
with the smallest counter, so an agent that sends many long requests gets no more than
one that sends few.  An agent that becomes backlogged again has its counter lifted to the
smallest counter of the agents already backlogged: idle time banks no credit.
"""

from __future__ import annotations

from typing import Any

from scheduler.policy import Policy, Quantum, nice_weight
from scheduler.request import Request


class VirtualTokenCounter(Policy):
    """Options: ``input_weight`` and ``output_weight`` (VTC's w_p and w_q; defaults 1 and 2)."""

    name = "fair"

    def __init__(self, quantum: Quantum, **opts: Any):
        super().__init__(quantum, **opts)
        self.counter: dict[str, float] = {}
        self.live: dict[str, int] = {}  # agent -> requests waiting or running (the backlogged agents)
        self.last_idle = 0.0  # counter of the agent that last left the backlog

    def admit(self, req: Request) -> None:
        agent = req.agent
        if not self.live.get(agent):
            backlogged = [self.counter.get(a, 0.0) for a, n in self.live.items() if n]
            floor = min(backlogged) if backlogged else self.last_idle
            self.counter[agent] = max(self.counter.get(agent, 0.0), floor)
        self.live[agent] = self.live.get(agent, 0) + 1

    def release(self, req: Request) -> None:
        agent = req.agent
        left = self.live.get(agent, 0) - 1
        if left > 0:
            self.live[agent] = left
        else:
            self.live.pop(agent, None)
            self.last_idle = self.counter.get(agent, 0.0)

    def account(self, req: Request, delta: float) -> None:
        self.counter[req.agent] = self.counter.get(req.agent, 0.0) + delta / nice_weight(req.nice)

    def priority(self, req: Request) -> tuple:
        return (self.counter.get(req.agent, 0.0), req.nice)

    def info(self, req: Request) -> dict[str, Any]:
        counter = round(self.counter.get(req.agent, 0.0), 3)
        return super().info(req) | {"priority": counter, "agent_counter": counter}
