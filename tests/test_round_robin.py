"""Round robin interleaves requests; FIFO does not; a short job overtakes long ones."""

import asyncio

from ipc.client import Client
from tests.conftest import messages


def runs(order: list[int]) -> list[int]:
    """Collapse consecutive duplicates: [1,1,2,2,1] -> [1,2,1]."""
    return [p for i, p in enumerate(order) if i == 0 or order[i - 1] != p]


def submit_in_order(c: Client, jobs: list[tuple[str, int]]) -> list:
    """Submit one after another, each accepted before the next is sent."""
    ids = []
    for prompt, n in jobs:
        cid = c.submit(messages(prompt), max_tokens=n, temperature=0.0)
        assert c.recv(cid)["event"] == "accepted"
        ids.append(cid)
    return ids


def collect(c: Client, ids: list) -> dict:
    events = {cid: list(c.events(cid)) for cid in ids}
    for evs in events.values():
        assert evs[-1].event == "done", evs[-1].data
    return events


def test_round_robin_alternates_and_short_job_finishes_first(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--quantum-tokens", "3")
    with d.client() as c:
        ids = submit_in_order(c, [("long one", 30), ("long two", 30), ("long three", 30)])
        events = collect(c, ids)
        tokens = sorted((e.seq, e.data["pid"]) for evs in events.values() for e in evs if e.event == "token")
        order = runs([pid for _, pid in tokens])
        # Three requests, 30 tokens each, 3 per quantum: ~10 turns each, strictly rotating.
        assert len(order) >= 25
        assert all(order[i] != order[i + 1] for i in range(len(order) - 1))
        assert order[:6] == order[:3] * 2  # round robin: the same rotation every turn

        long_a, long_b, short = submit_in_order(c, [("long A", 40), ("long B", 40), ("short C", 4)])
        events = collect(c, [long_a, long_b, short])
        done_seq = {cid: evs[-1].seq for cid, evs in events.items()}
        assert done_seq[short] < done_seq[long_a] and done_seq[short] < done_seq[long_b]
        assert events[long_a][-1].data["stats"]["preemptions"] > 0


def test_fifo_runs_to_completion_in_order(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--policy", "fifo", "--quantum-tokens", "2")
    with d.client() as c:
        ids = submit_in_order(c, [("first", 12), ("second", 12), ("third", 4)])
        events = collect(c, ids)
    tokens = sorted((e.seq, e.data["pid"]) for evs in events.values() for e in evs if e.event == "token")
    assert len(runs([pid for _, pid in tokens])) == 3
    assert all(evs[-1].data["stats"]["preemptions"] == 0 for evs in events.values())


def test_async_client_concurrent_and_ps(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--quantum-tokens", "2")

    async def go():
        async with d.aclient(agent="a1") as c:
            first = await c.chat("count", max_tokens=40, stream=True)
            ev = await first.__anext__()
            assert ev.event == "accepted"
            others = [asyncio.ensure_future(c.chat(f"q{i}", max_tokens=8)) for i in range(3)]
            seen = [ev async for ev in first]
            table = await c.ps()
            results = await asyncio.gather(*others)
            return seen, table, results

    seen, table, results = asyncio.run(go())
    assert seen[-1].event == "done"
    assert {"preempted", "resumed"} <= {e.event for e in seen}
    assert all(r.finish_reason in ("length", "stop") for r in results)
    assert table["workers"][0]["alive"] is True
