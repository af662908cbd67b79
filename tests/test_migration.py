"""Migration: with two workers, a preempted context moves to the worker with a free slot,
as raw tensor frames, and the output stays token-identical."""

import collections
import time

import pytest

from ipc.client import result_of
from tests.conftest import hf_greedy, messages
from tests.test_openai_backend import free_port

PROMPTS = [f"Request number {i}: tell me something." for i in range(3)]
MAX_TOKENS = 40


def lone_request(c, pids: list[int]) -> int:
    """Once all three requests have run and two share one worker's slot, the one alone on the other."""
    deadline = time.monotonic() + 120
    while True:
        rows = {r["pid"]: r for r in c.ps()["requests"] if r["pid"] in pids}
        homes = collections.Counter(r["worker"] for r in rows.values())
        if len(rows) == 3 and all(r["quanta"] >= 1 for r in rows.values()) and sorted(homes.values()) == [1, 2]:
            return next(pid for pid, r in rows.items() if homes[r["worker"]] == 1)
        assert time.monotonic() < deadline, rows
        time.sleep(0.01)  # polling ps with a deadline, not synchronising on a guess


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_migrating_contexts_changes_nothing(transport, tiny_model_dir, start_daemon):
    """Three requests on two one-slot workers: two share a worker turn by turn (a waiting request
    prefers its context's home), the third runs alone on the other.  Killing the lone one frees its
    worker while the other is busy, so the context waiting there must move over, whatever the
    workers' relative speed (letting the lone one finish first failed when its worker was the slower)."""
    refs = hf_greedy(tiny_model_dir, PROMPTS, MAX_TOKENS)
    # Over ipc:// the workers push contexts to each other; a tcp:// worker endpoint has no inboxes
    # (the daemon cannot know a route between remote workers), so the daemon relays the frames.
    tcp = ("--worker-endpoint", f"tcp://127.0.0.1:{free_port()}") if transport == "tcp" else ()
    d = start_daemon(tiny_model_dir, "--workers", "2", "--quantum-tokens", "2", "--snapshot-tier", "host", *tcp)
    with d.client() as c:
        cids = [c.submit(messages(p), max_tokens=MAX_TOKENS) for p in PROMPTS]
        streams = [c.events(cid) for cid in cids]
        pids = [next(s).data["pid"] for s in streams]  # accepted
        lone = lone_request(c, pids)
        c.kill(lone)
        results = {pid: result_of(list(s)) if pid != lone else list(s) for pid, s in zip(pids, streams, strict=True)}
    assert results.pop(lone)[-1].event == "cancelled"
    for pid, ref in zip(pids, refs, strict=True):
        if pid == lone:
            continue
        r = results[pid]
        assert r.token_ids == ref
        assert r.stats["prompt_tokens_computed"] == r.usage["prompt_tokens"]  # migration recomputed nothing
        assert r.stats["decode_tokens_computed"] == r.usage["completion_tokens"] - 1
    migrated = [e for r in results.values() for e in r.events if e.event == "resumed" and e.data.get("migrated")]
    assert len(migrated) >= 1
    assert all(e.data["direct"] is (transport == "ipc") for e in migrated)
    assert sum(r.stats["migrations"] for r in results.values()) == len(migrated)
    workers = {e.data["worker"] for r in results.values() for e in r.events if e.event == "resumed"}
    assert workers == {"w0", "w1"}
