"""Scheduling policies: the ordering logic alone (a simulated worker), then through a real daemon."""

from __future__ import annotations

import asyncio
import json

import pytest

from ipc.client import ClientError
from scheduler.core import Scheduler
from scheduler.policies import make_policy
from scheduler.policy import Quantum, nice_weight
from scheduler.request import Request, State
from scheduler.workers import Worker
from tests.conftest import messages
from tests.test_cli import quantad
from tests.test_round_robin import collect, submit_in_order


# ---- a simulated single-slot worker ---------------------------------------------------------
class Sim:
    """Drives ``Scheduler`` as the daemon does, with a worker that emits one token per step."""

    def __init__(self, policy: str, quantum_tokens: int = 2, slots: int = 1, **opts: str):
        self.sched = Scheduler(make_policy(policy, Quantum(tokens=quantum_tokens), opts))
        self.sched.workers["w0"] = Worker("w0", slots, alive=True)
        self.pids = iter(range(1, 10_000))
        self.trace: list[int] = []  # pid of every token, in order
        self.done: list[int] = []
        self.left: dict[int, int] = {}  # pid -> tokens of the current quantum left
        self.want: dict[int, int] = {}

    def submit(self, tokens: int, agent: str = "", prompt: str = "hi", owner: str = "", **params) -> Request:
        req = Request(next(self.pids), b"", None, {"agent": agent, "messages": messages(prompt), **params}, owner=owner)
        self.want[req.pid] = tokens
        self.sched.add(req)
        self._start()
        return req

    def _start(self) -> None:
        for req in self.sched.schedule():
            self.left[req.pid] = self.sched.policy.quantum_for(req).tokens or 10**9

    def step(self) -> None:
        """One token for every running request; quantum ends and finishes as a worker reports them.

        As with a batched worker, every quantum end of a step reaches the daemon before the
        ``preempted`` answers to the preemptions it orders.
        """
        yielding = []
        for pid in sorted(self.sched.workers["w0"].running):
            req = self.sched.table[pid]
            req.generated += 1
            self.trace.append(pid)
            self.left[pid] -= 1
            if req.generated >= self.want[pid]:
                self.sched.finish(req, State.DONE)
                self.done.append(pid)
            elif self.left[pid] == 0:
                if self.sched.quantum_end(req, req.generated):
                    yielding.append(req)
                else:
                    self.left[pid] = self.sched.policy.quantum_for(req).tokens or 10**9
        for req in yielding:
            self.sched.preempt(req)
        self._start()

    def run(self, until=lambda: False, limit: int = 10_000) -> None:
        for _ in range(limit):
            if until() or not self.sched.workers["w0"].running:
                return
            self.step()


def test_rr_and_fifo_pick_lower_nice_first():
    for policy in ("rr", "fifo"):
        sim = Sim(policy)
        first = sim.submit(4)  # takes the free slot
        low, high = sim.submit(4, nice=10), sim.submit(4, nice=-5)
        sim.run()
        # rr: the nicer waiting request takes the slot at the quantum end; fifo never preempts.
        expected = [high.pid, first.pid, low.pid] if policy == "rr" else [first.pid, high.pid, low.pid]
        assert sim.done == expected, policy


def test_rr_nice_running_keeps_slot_against_higher_nice():
    sim = Sim("rr")
    important = sim.submit(8, nice=-10)
    background = sim.submit(8, nice=5)
    sim.run()
    assert sim.trace == [important.pid] * 8 + [background.pid] * 8
    assert important.preemptions == 0


def test_mlfq_demotes_and_short_job_overtakes():
    sim = Sim("mlfq", quantum_tokens=2)
    long_a, long_b = sim.submit(40), sim.submit(40)
    sim.run(until=lambda: long_a.generated >= 14)
    assert long_b.preemptions >= 2  # the two long ones took turns, level by level
    pol = sim.sched.policy
    assert pol.level[long_a.pid] >= 2 and pol.info(long_a)["demotions"] >= 2
    assert pol.slice_quanta(long_a) == 1 << pol.level[long_a.pid]  # the slice doubles per level
    assert pol.quantum_for(long_a).tokens == 2  # checked in at every base quantum
    short = sim.submit(3)
    assert pol.level[short.pid] == 0
    sim.run()
    assert sim.done[0] == short.pid
    # Once the short one arrived it had the slot at its first quantum end.
    first = sim.trace.index(short.pid)
    assert sim.trace[first : first + 2] == [short.pid, short.pid]


def test_mlfq_skip_join_and_boost():
    sim = Sim("mlfq", quantum_tokens=2, prefill_tokens="16", levels="4", boost_quanta="3")
    pol = sim.sched.policy
    assert [pol.entry_level(n) for n in (1, 16, 17, 32, 33, 64, 10_000)] == [0, 0, 1, 1, 2, 2, 3]
    long_prompt = sim.submit(30, prompt="x" * 400)  # ~105 tokens: level 3
    assert pol.info(long_prompt)["entry_level"] == 3 and pol.slice_quanta(long_prompt) == 8
    other = sim.submit(30)
    sim.run(until=lambda: pol.boosts > 0)
    assert pol.level[other.pid] == 0 and pol.level[long_prompt.pid] == 0


def test_fair_balances_greedy_and_polite_agents():
    sim = Sim("fair", quantum_tokens=2)
    for _ in range(4):
        sim.submit(30, agent="greedy")
    for _ in range(3):  # the polite agent sends its next call when the last one is done
        polite = sim.submit(10, agent="polite")
        sim.run(until=lambda p=polite: p.finished)
    served = {"greedy": 0, "polite": 0}
    for pid in sim.trace:
        served[sim.sched.table[pid].agent] += 1
    # 30 polite tokens; the greedy agent, with four requests in flight, got about as much, not 4x.
    assert served["polite"] == 30
    assert 20 <= served["greedy"] <= 40, served
    assert abs(vtc(sim, "greedy") - vtc(sim, "polite")) <= 2 * 2 * 2 + 20  # one quantum each + a prompt


def vtc(sim: Sim, agent: str, owner: str = "") -> float:
    return sim.sched.policy.counter[f"program:{owner}|agent:{agent}"]


def test_fair_counts_identities_before_agent_names():
    """One identity's four agent names share one identity's share against another identity's one agent."""
    sim = Sim("fair", quantum_tokens=2)
    for i in range(4):
        sim.submit(30, agent=f"name{i}", owner="uid:1000")
    for _ in range(3):
        polite = sim.submit(10, agent="polite", owner="uid:1001")
        sim.run(until=lambda p=polite: p.finished)
    served = {"uid:1000": 0, "uid:1001": 0}
    for pid in sim.trace:
        served[sim.sched.table[pid].owner] += 1
    assert served["uid:1001"] == 30 and 20 <= served["uid:1000"] <= 40, served
    assert sim.sched.policy.info(polite)["owner_counter"] > 0


def test_fair_new_agent_cannot_bank_credit():
    sim = Sim("fair", quantum_tokens=2)
    sim.submit(20, agent="a")
    sim.run(until=lambda: vtc(sim, "a") > 30)
    late = sim.submit(5, agent="late")
    assert vtc(sim, "late") == pytest.approx(vtc(sim, "a"))
    assert late.state is State.READY


def test_fair_nice_weighs_service():
    sim = Sim("fair", quantum_tokens=1)
    favoured = sim.submit(100, agent="fav", nice=-5)
    plain = sim.submit(100, agent="plain")
    sim.run(until=lambda: plain.generated >= 20)
    assert favoured.generated > 2 * plain.generated  # weight 1.25**5 = 3.05
    assert nice_weight(-5) == pytest.approx(1.25**5)


def test_plas_short_program_not_starved_by_long_chain():
    sim = Sim("plas", quantum_tokens=2)
    sim.submit(30, agent="chain")
    sim.run()
    chain2 = sim.submit(30, agent="chain")  # the chain's next call starts with its program's service
    sim.run(until=lambda: chain2.generated >= 4)
    short = sim.submit(8, agent="short")
    pol = sim.sched.policy
    assert pol.info(chain2)["level"] > pol.info(short)["level"] == 0
    sim.run()
    assert sim.done[-2:] == [short.pid, chain2.pid]
    assert short.preemptions == 0
    first = sim.trace.index(short.pid)
    assert sim.trace[first : first + 8] == [short.pid] * 8


def test_plas_session_is_its_own_program_and_decay():
    sim = Sim("plas", quantum_tokens=2, decay_quanta="4")
    a = sim.submit(12, agent="x", session="s1")
    sim.run()
    pol = sim.sched.policy
    assert "|session:s1" in pol.attained and "|agent:x" not in pol.attained  # keys: owner|program
    assert pol.attained["|session:s1"] < pol.input_weight * a.prompt_tokens + 2 * 12  # halved at least once


def test_plas_charges_only_the_prompt_its_worker_computed():
    """A resent conversation whose state was cached costs its new part only, once the worker said so."""
    pol = make_policy("plas", Quantum(tokens=2))
    req = Request(1, b"", None, {"messages": messages("hi")})
    req.prompt_tokens, req.generated = 1000, 10
    assert pol.service(req) == 2 * 10  # before its first quantum's end the reused part is not known
    sched = Scheduler(pol)
    sched.workers["w0"] = Worker("w0", 1, alive=True)
    sched.add(req)
    sched.schedule()
    sched.quantum_end(req, 10, prompt_tokens=1000, prompt_reused=900)
    assert pol.service(req) == pol.input_weight * 100 + 2 * 10
    assert pol.info(req)["attained"] == pytest.approx(pol.service(req))


def test_mlfq_with_two_slots_frees_only_what_waiters_need():
    sim = Sim("mlfq", quantum_tokens=2, slots=2)
    a, b = sim.submit(20), sim.submit(20)
    sim.run(until=lambda: a.generated >= 2)
    assert a.preemptions == b.preemptions == 0  # nobody waited: both went on, one level down
    c = sim.submit(4)
    sim.run(until=lambda: c.generated >= 1)
    assert a.preemptions + b.preemptions == 1  # one slot freed for the one waiter, not both
    sim.run()
    assert sim.done[0] == c.pid and c.preemptions == 0  # the short one, once in, ran to its end


def test_srpt_shortest_remaining_first_strictly_and_aging():
    sim = Sim("srpt", quantum_tokens=2, aging="0")
    long_a = sim.submit(40, max_tokens=40)
    sim.run(until=lambda: long_a.generated >= 4)
    mid, short = sim.submit(20, max_tokens=20), sim.submit(6, max_tokens=6)
    sim.run()
    assert sim.done == [short.pid, mid.pid, long_a.pid]
    first = sim.trace.index(short.pid)
    assert sim.trace[first : first + 6] == [short.pid] * 6  # once in, nothing shorter took its slot
    assert short.preemptions == mid.preemptions == 0 and long_a.preemptions == 1
    pol = sim.sched.policy
    assert pol.info(long_a)["remaining"] == 0
    twins = Sim("srpt", quantum_tokens=2)
    a, b = twins.submit(10, max_tokens=10), twins.submit(10, max_tokens=10)
    twins.run()
    assert twins.done == [a.pid, b.pid] and a.preemptions == 0  # equal: no turns for nothing
    aged = make_policy("srpt", Quantum(tokens=2), {"aging": "1000"})
    waiting = Request(1, b"", None, {"messages": messages("x"), "max_tokens": 500})
    waiting.move(State.READY)
    waiting.since -= 1.0  # it has waited a second: 1000 tokens of rank
    assert aged.priority(waiting)[0] < 0 < make_policy("srpt", Quantum(tokens=2)).remaining(waiting)


def test_serve_rejects_bad_policy_options(tmp_path):
    out = quantad("serve", "--policy", "mlfq", "--policy-opt", "bogus=1", "--endpoint", f"ipc://{tmp_path}/a.sock")
    assert out.returncode != 0 and "no option 'bogus'" in out.stderr
    out = quantad("serve", "--policy", "lottery", "--endpoint", f"ipc://{tmp_path}/a.sock")
    assert out.returncode != 0 and "invalid choice" in out.stderr


def test_policy_options_are_checked():
    with pytest.raises(ValueError, match="no option"):
        make_policy("mlfq", Quantum(tokens=2), {"bogus": "1"})
    with pytest.raises(ValueError, match="must be int"):
        make_policy("mlfq", Quantum(tokens=2), {"levels": "many"})
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lottery", Quantum(tokens=2))
    assert make_policy("fifo", Quantum(tokens=2)).quantum.infinite
    assert make_policy("fair", Quantum(tokens=2), {"output_weight": "1"}).output_weight == 1.0


# ---- through a real daemon ------------------------------------------------------------------
def done_order(events: dict) -> list:
    return sorted(events, key=lambda cid: events[cid][-1].seq)


def test_daemon_mlfq_short_job_first_and_demotions(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--policy", "mlfq", "--quantum-tokens", "2", "--policy-opt", "boost_quanta=1000")
    with d.client(timeout=120) as c:
        long_a, long_b = submit_in_order(c, [("long A", 40), ("long B", 40)])
        short = c.submit(messages("short C"), max_tokens=4, temperature=0.0)
        table = c.ps()
        assert table["policy"] == "mlfq"
        assert all("level" in r and "nice" in r and "demotions" in r for r in table["requests"])
        events = collect(c, [long_a, long_b, short])
    assert done_order(events)[0] == short
    stats = events[long_a][-1].data["stats"]
    assert stats["demotions"] >= 3 and stats["level"] >= 3 and stats["preemptions"] > 0
    assert events[short][-1].data["stats"]["demotions"] <= 1


def test_daemon_fair_between_greedy_and_polite(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--policy", "fair", "--quantum-tokens", "2")

    async def go():
        async with d.aclient(agent="greedy", timeout=120) as g, d.aclient(agent="polite", timeout=120) as p:
            greedy = [asyncio.ensure_future(g.chat(f"greedy {i}", max_tokens=40)) for i in range(4)]
            await asyncio.sleep(0)
            seen = []
            for i in range(3):  # the polite agent's next call follows its last one
                seen += [ev async for ev in await p.chat(f"polite {i}", max_tokens=12, stream=True)]
            return seen, await asyncio.gather(*greedy)

    polite, greedy = asyncio.run(go())
    last = max(ev.seq for ev in polite)
    polite_tokens = sum(len(ev.data["token_ids"]) for ev in polite if ev.event == "token")
    greedy_tokens = sum(len(ev.data["token_ids"]) for r in greedy for ev in r.events
                        if ev.event == "token" and ev.seq < last)  # fmt: skip
    assert polite_tokens == 36
    # Four greedy requests against one polite one at a time: round robin gave greedy 136 tokens here, fair 36.
    assert polite_tokens / 2 <= greedy_tokens <= 1.5 * polite_tokens, (greedy_tokens, polite_tokens)
    assert all(r.stats["agent_counter"] > 0 for r in greedy)


def test_daemon_plas_short_agent_not_starved(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--policy", "plas", "--quantum-tokens", "2")
    with d.client(agent="chain", timeout=120) as c, d.client(agent="short", timeout=120) as s:
        c.chat("first call of a long chain", max_tokens=30)
        cid = c.submit(messages("second call"), max_tokens=40, temperature=0.0)
        it = c.events(cid)
        while next(it).event != "token":
            pass
        short = s.chat("quick question", max_tokens=8)
        rest = list(it)
    assert short.stats["preemptions"] == 0 and short.stats["level"] == 0
    assert rest[-1].event == "done" and rest[-1].seq > short.events[-1].seq
    assert rest[-1].data["stats"]["level"] >= 1 and rest[-1].data["stats"]["program"] == "agent:chain"


def test_daemon_srpt_short_request_overtakes_long_ones(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--policy", "srpt", "--quantum-tokens", "2")
    with d.client(timeout=120) as c:
        long_a, long_b = submit_in_order(c, [("long A", 40), ("long B", 30)])
        short = c.submit(messages("short C"), max_tokens=4, temperature=0.0)
        table = c.ps()
        assert table["policy"] == "srpt" and all("remaining" in r for r in table["requests"])
        events = collect(c, [long_a, long_b, short])
    assert done_order(events) == [short, long_b, long_a]
    assert events[short][-1].data["stats"]["preemptions"] == 0
    assert events[long_a][-1].data["stats"]["preemptions"] >= 1


def test_daemon_nice_orders_and_renice(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--quantum-tokens", "3")
    ep = ["--endpoint", d.endpoint]
    with d.client(timeout=120) as c:
        (blocker,) = submit_in_order(c, [("hold the slot", 12)])
        low = c.submit(messages("low"), max_tokens=6, temperature=0.0, nice=10)
        high = c.submit(messages("high"), max_tokens=6, temperature=0.0, nice=-10)
        events = collect(c, [blocker, low, high])
        assert done_order(events) == [high, blocker, low] or done_order(events)[:2] == [blocker, high]
        first_token = {cid: next(e.seq for e in evs if e.event == "token") for cid, evs in events.items()}
        assert first_token[high] < first_token[low]

        # Renice a waiting request: it overtakes the one that was ahead of it.
        blocker = c.submit(messages("hold the slot"), max_tokens=1000, temperature=0.0, nice=-20)
        pid_blocker = c.recv(blocker)["pid"]
        a = c.submit(messages("a"), max_tokens=4, temperature=0.0)
        b = c.submit(messages("b"), max_tokens=4, temperature=0.0)
        pid_b = c.recv(b)["pid"]
        out = quantad("nice", str(pid_b), "-5", "--json", *ep)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"pid": pid_b, "nice": -5, "old": 0}
        row = next(r for r in c.ps()["requests"] if r["pid"] == pid_b)
        assert row["nice"] == -5 and row["priority"] == -5
        table = quantad("ps", *ep).stdout.splitlines()
        assert table[0].split()[3:5] == ["NI", "PRI"]
        with pytest.raises(ClientError) as bad:
            c.nice(pid_b, 20)
        assert bad.value.code == "bad_field"
        c.kill(pid_blocker)  # nice -20: nothing preempted it; now a and b compete
        assert list(c.events(blocker))[-1].event == "cancelled"
        events = {cid: list(c.events(cid)) for cid in (a, b)}
        first_token = {cid: next(e.seq for e in evs if e.event == "token") for cid, evs in events.items()}
        assert first_token[b] < first_token[a]
        assert events[b][-1].data["stats"]["nice"] == -5

        with pytest.raises(ClientError) as bad:
            c.nice(424242, 1)
        assert bad.value.code == "not_found"
        for value in (20, -21, True, 1.5):
            with pytest.raises(ClientError) as bad:
                c.chat("x", max_tokens=2, nice=value)
            assert bad.value.code == "bad_field"
        assert c.ping()["pong"] is True
    missing = quantad("nice", "424242", "3", *ep)
    assert missing.returncode == 2 and "not_found" in missing.stderr
    out = quantad("run", "hi", "--nice", "99", "--max-tokens", "2", *ep)
    assert out.returncode == 2 and "bad_field" in out.stderr
