"""Migration: with two workers, a preempted context moves to the worker with a free slot,
as raw tensor frames, and the output stays token-identical."""

import asyncio

import pytest

from tests.conftest import hf_greedy, messages
from tests.test_openai_backend import free_port

PROMPTS = [f"Request number {i}: tell me something." for i in range(3)]
MAX_TOKENS = 30


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_migrating_contexts_changes_nothing(transport, tiny_model_dir, start_daemon):
    """Three requests on two one-slot workers: two share a worker, turn by turn (a waiting request
    prefers its context's home), while the third runs alone on the other.  That one ends first, its
    worker is then free while the other is busy, so a context waiting there must move over.  (Six
    requests left it to the workers' relative speed whether the homes ever fell out of balance.)"""
    refs = hf_greedy(tiny_model_dir, PROMPTS, MAX_TOKENS)
    assert all(len(r) == MAX_TOKENS for r in refs)  # no early EOS: the scenario above holds
    # Over ipc:// the workers push contexts to each other; a tcp:// worker endpoint has no inboxes
    # (the daemon cannot know a route between remote workers), so the daemon relays the frames.
    tcp = ("--worker-endpoint", f"tcp://127.0.0.1:{free_port()}") if transport == "tcp" else ()
    d = start_daemon(tiny_model_dir, "--workers", "2", "--quantum-tokens", "2", "--snapshot-tier", "host", *tcp)

    async def go():
        async with d.aclient() as c:
            return await asyncio.gather(*(c.chat(messages(p), max_tokens=MAX_TOKENS) for p in PROMPTS))

    results = asyncio.run(go())
    for ref, r in zip(refs, results, strict=True):
        assert r.token_ids == ref
        assert r.stats["prompt_tokens_computed"] == r.usage["prompt_tokens"]  # migration recomputed nothing
        assert r.stats["decode_tokens_computed"] == r.usage["completion_tokens"] - 1
    migrated = [e for r in results for e in r.events if e.event == "resumed" and e.data.get("migrated")]
    assert migrated, "no request migrated"
    assert all(e.data["direct"] is (transport == "ipc") for e in migrated)
    assert sum(r.stats["migrations"] for r in results) == len(migrated)
    workers = {e.data["worker"] for r in results for e in r.events if e.event == "resumed"}
    assert workers == {"w0", "w1"}
