"""Resuming from every tier through the real daemon: identical output, nothing recomputed
for swap tiers, and no snapshot file left behind."""

import asyncio

import pytest

from tests.conftest import PROMPTS, messages

MAX_TOKENS = 20


async def run_all(d):
    async with d.aclient() as c:
        return await asyncio.gather(*(c.chat(messages(p), max_tokens=MAX_TOKENS) for p in PROMPTS))


def snapshot_files(d) -> list:
    return sorted(d.state_dir.rglob("ctx-*"))


@pytest.fixture(scope="module")
def alone(tiny_model_dir, tmp_path_factory):
    """The reference: each request run with no preemption (FIFO, one slot)."""
    from tests.conftest import DaemonProc

    d = DaemonProc(tiny_model_dir, tmp_path_factory.mktemp("alone"), "--policy", "fifo")
    try:
        return [r.token_ids for r in asyncio.run(run_all(d))]
    finally:
        d.stop()


@pytest.mark.parametrize("tier", ["device", "host", "disk", "recompute"])
def test_resume_from_each_tier(tier, tiny_model_dir, start_daemon, alone):
    d = start_daemon(tiny_model_dir, "--slots", "2", "--quantum-tokens", "3", "--snapshot-tier", tier)
    results = asyncio.run(run_all(d))
    assert [r.token_ids for r in results] == alone
    contexts = {e.data["context"] for r in results for e in r.events if e.event == "preempted"}
    assert contexts == {tier}
    for r in results:
        assert r.stats["preemptions"] > 0
        if tier == "recompute":  # the prefix is fed again on every resume
            assert r.stats["prompt_tokens_computed"] > r.usage["prompt_tokens"]
        else:  # swap tiers recompute nothing
            assert r.stats["prompt_tokens_computed"] == r.usage["prompt_tokens"]
    assert snapshot_files(d) == []


def test_killed_request_on_disk_leaves_no_file(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--quantum-tokens", "2", "--snapshot-tier", "disk")
    with d.client() as c:
        a = c.submit(messages("first, long"), max_tokens=400)
        b = c.submit(messages("second, long"), max_tokens=400)
        ev_a = c.events(a)
        pid_a = next(ev_a).data["pid"]
        while next(ev_a).event != "preempted":  # A's context is now a file on disk
            pass
        row = next(r for r in c.ps()["requests"] if r["pid"] == pid_a)
        assert row["context"] == "disk" and row["context_bytes"] > 0
        assert len(snapshot_files(d)) >= 1
        c.kill(pid_a)
        c.kill(next(c.events(b)).data["pid"])
        # The worker handles messages in order: once a later request is done, the cancels are done.
        assert c.chat("after", max_tokens=2).usage["completion_tokens"] >= 1
    assert snapshot_files(d) == []
