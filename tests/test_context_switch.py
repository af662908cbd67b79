"""Invariants 1 and 2 on a real daemon with real worker processes (tiny model).

Preempting a request any number of times changes nothing in its output, and resuming
recomputes nothing: prefill tokens computed == prompt tokens, one token per decode step.
"""

import asyncio

import pytest

from tests.conftest import PROMPTS, hf_greedy, messages

MAX_TOKENS = 24
SAMPLING = {"temperature": 0.9, "top_p": 0.95}


@pytest.fixture(scope="module")
def greedy_reference(tiny_model_dir):
    return hf_greedy(tiny_model_dir, PROMPTS, MAX_TOKENS)


async def run_all(daemon, sampling: bool):
    async with daemon.aclient(agent="test") as c:
        jobs = []
        for i, p in enumerate(PROMPTS):
            kw = dict(SAMPLING, seed=100 + i) if sampling else {"temperature": 0.0}
            jobs.append(c.chat(messages(p), max_tokens=MAX_TOKENS, **kw))
        return await asyncio.gather(*jobs)


@pytest.fixture(scope="module")
def sampling_reference(tiny_model_dir, tmp_path_factory):
    """Seeded sampling with no preemption at all (FIFO, one request at a time)."""
    from tests.conftest import DaemonProc

    d = DaemonProc(tiny_model_dir, tmp_path_factory.mktemp("fifo"), "--policy", "fifo")
    try:
        results = asyncio.run(run_all(d, sampling=True))
    finally:
        d.stop()
    assert all(r.stats["preemptions"] == 0 for r in results)
    return [r.token_ids for r in results]


def assert_no_recompute(r):
    s = r.stats
    assert s["prompt_tokens_computed"] == r.usage["prompt_tokens"], s
    # The first token comes from the prefill's logits; each later one costs exactly one token fed.
    assert s["decode_tokens_computed"] == r.usage["completion_tokens"] - 1, s


@pytest.mark.parametrize("quantum", [1, 2, 7])
def test_preempted_output_is_identical(quantum, tiny_model_dir, start_daemon, greedy_reference, sampling_reference):
    d = start_daemon(tiny_model_dir, "--quantum-tokens", str(quantum))
    greedy = asyncio.run(run_all(d, sampling=False))
    sampled = asyncio.run(run_all(d, sampling=True))
    assert [r.token_ids for r in greedy] == greedy_reference
    assert [r.token_ids for r in sampled] == sampling_reference
    for r in greedy + sampled:
        assert len(r.token_ids) == r.usage["completion_tokens"]
        assert_no_recompute(r)
    assert sum(r.stats["preemptions"] for r in greedy) >= len(PROMPTS)
    assert max(r.stats["preemptions"] for r in greedy) >= MAX_TOKENS // quantum - len(PROMPTS)


def test_host_tier_resume_is_identical(tiny_model_dir, start_daemon, greedy_reference):
    """With no device budget every snapshot is copied to host memory and back."""
    d = start_daemon(tiny_model_dir, "--quantum-tokens", "2", "--device-budget", "0")
    greedy = asyncio.run(run_all(d, sampling=False))
    assert [r.token_ids for r in greedy] == greedy_reference
    for r in greedy:
        assert_no_recompute(r)
        assert r.stats["preemptions"] > 0
    preempted = [e for r in greedy for e in r.events if e.event == "preempted"]
    assert preempted and all(e.data["context"] == "host" for e in preempted)
