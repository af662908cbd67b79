"""Fair share across identities and their agents with virtual token counters, after VTC (Sheng et al., OSDI 2024).

Each agent has a counter of the service its requests received (weighted prompt and output
tokens, divided by the request's nice weight).  A free slot goes to the backlogged agent
with the smallest counter, so an agent that sends many long requests gets no more than
one that sends few.  An agent that becomes backlogged again has its counter lifted to the
smallest counter of the agents already backlogged: idle time banks no credit.
"""

from __future__ import annotations

from typing import Any

from scheduler.policy import Policy, Quantum, join_backlog, leave_backlog, nice_weight, share_keys
from scheduler.request import Request


class VirtualTokenCounter(Policy):
    """Options: ``input_weight`` and ``output_weight`` (VTC's w_p and w_q; defaults 1 and 2).

    Two levels of counters: the identity that sent a request (``scheduler.gate``: a uid, a key, an
    HTTP token) and the agent program within it (``Request.program``: its session, its agent label,
    else the conversation it continues).  A slot goes to the backlogged identity with the least
    service, and within it to the program with the least: a flood spread over many agent names
    still counts as one identity.
    """

    name = "fair"

    def __init__(self, quantum: Quantum, **opts: Any):
        super().__init__(quantum, **opts)
        self.counter: dict[str, float] = {}
        self.live: dict[str, int] = {}  # key -> requests waiting or running (the backlogged keys)
        self.last_idle = {0: 0.0, 1: 0.0}  # per level, the counter of the key that last left the backlog

    def admit(self, req: Request) -> None:
        for level, key in enumerate(share_keys(req)):
            if not self.live.get(key):
                peers = [self.counter.get(k, 0.0) for k, n in self.live.items() if n and k[:6] == key[:6]]
                floor = min(peers) if peers else self.last_idle[level]
                self.counter[key] = max(self.counter.get(key, 0.0), floor)
            join_backlog(self.live, key)

    def release(self, req: Request) -> None:
        for level, key in enumerate(share_keys(req)):
            if leave_backlog(self.live, key):
                self.last_idle[level] = self.counter.get(key, 0.0)

    def account(self, req: Request, delta: float) -> None:
        for key in share_keys(req):
            self.counter[key] = self.counter.get(key, 0.0) + delta / nice_weight(req.nice)

    def priority(self, req: Request) -> tuple:
        owner, agent = share_keys(req)
        return (self.counter.get(owner, 0.0), self.counter.get(agent, 0.0), req.nice)

    def info(self, req: Request) -> dict[str, Any]:
        owner, agent = (round(self.counter.get(k, 0.0), 3) for k in share_keys(req))
        return super().info(req) | {
            "priority": agent,
            "agent_counter": agent,  # the program's (named so before programs were derived)
            "program_counter": agent,
            "owner_counter": owner,
        }
