"""Continuous batching: slots decode together, join and leave between steps, and a row's
output is the same as alone (greedy, fp32, CPU), however often it is preempted."""

import asyncio

import pytest

from tests.conftest import hf_greedy, messages

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Write a long poem about the sea, the wind, and the sailors who cross it every night.",
    "List three prime numbers.",
    "Explain recursion in one sentence to a five year old child who likes trains.",
    "Say hello.",
    "Why?",
    "Count from one to twenty, separated by commas, and then say done.",
    "Name a color.",
    "What is two plus two? Answer with a number only, please, and nothing else at all.",
    "Tell me a joke.",
    "Describe a cat.",
]
MAX_TOKENS = [20, 12, 28, 9, 24, 16, 30, 22, 11, 26, 14, 18]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return hf_greedy(tiny_model_dir, PROMPTS, MAX_TOKENS)


async def run_all(d):
    async with d.aclient(agent="batch") as c:
        return await asyncio.gather(
            *(c.chat(messages(p), max_tokens=n) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True))
        )


@pytest.mark.parametrize(
    "flags",
    [
        ("--slots", "8", "--policy", "fifo"),  # a batch of 8 with different lengths, no preemption
        ("--slots", "4", "--quantum-tokens", "3"),  # 12 requests round-robin through 4 slots
        ("--slots", "4", "--quantum-tokens", "2", "--device-budget", "0", "--prefill-chunk", "7"),  # host tier
        ("--slots", "4", "--quantum-ms", "1"),  # time quanta: rows decode on while the daemon decides
    ],
    ids=["batch8", "rr-4-slots", "rr-host-chunked", "rr-4-slots-ms"],
)
def test_batched_output_identical_to_alone(flags, tiny_model_dir, start_daemon, reference):
    d = start_daemon(tiny_model_dir, *flags)
    results = asyncio.run(run_all(d))
    assert [r.token_ids for r in results] == reference
    for r in results:
        assert r.stats["decode_tokens_computed"] == r.usage["completion_tokens"] - 1
        assert r.stats["prompt_tokens_computed"] == r.usage["prompt_tokens"]
    preemptions = sum(r.stats["preemptions"] for r in results)
    if "fifo" in flags:
        assert preemptions == 0
    elif "--quantum-ms" in flags:  # where a time quantum ends depends on the clock; that one does is certain
        assert preemptions >= 1
    else:
        assert preemptions >= len(PROMPTS) - 4


def test_batch_really_runs_together(tiny_model_dir, start_daemon):
    """With 4 slots and 4 requests, tokens of different requests interleave."""
    d = start_daemon(tiny_model_dir, "--slots", "4", "--policy", "fifo")

    async def go():
        async with d.aclient() as c:
            return await asyncio.gather(*(c.chat(f"request {i}", max_tokens=16) for i in range(4)))

    results = asyncio.run(go())
    # token events in arrival order (a row's tokens may come several to an event: backends/outbox.py)
    pids = [pid for _, pid in sorted((e.seq, e.data["pid"]) for r in results for e in r.events if e.event == "token")]
    for pid in set(pids):
        first, last = pids.index(pid), len(pids) - 1 - pids[::-1].index(pid)
        assert set(pids[first : last + 1]) == set(pids), "every request streams while each of the others does"


def test_session_prefills_only_new_tokens_and_answers_the_same(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--slots", "2", "--quantum-tokens", "4")
    questions = ["Hello there.", "Tell me more.", "And then what happened?", "Thanks, bye."]

    def converse(c, session):
        convo, results = [], []
        for q in questions:
            convo.append({"role": "user", "content": q})
            r = c.chat(list(convo), max_tokens=12, session=session)
            convo.append({"role": "assistant", "content": r.text})
            results.append(r)
        return results

    with d.client() as c:
        plain = converse(c, None)
        kept = converse(c, "agent-7")
    assert [r.text for r in kept] == [r.text for r in plain]
    for turn, r in enumerate(kept):
        s = r.stats
        assert s["prompt_tokens_computed"] + s["prompt_tokens_reused"] == r.usage["prompt_tokens"]
        if turn > 0:  # everything but the new turn (and a re-tokenised edge) comes from the session
            assert s["prompt_tokens_reused"] >= plain[turn - 1].usage["prompt_tokens"]
    computed = sum(r.stats["prompt_tokens_computed"] for r in kept)
    assert computed < sum(r.usage["prompt_tokens"] for r in plain) * 0.7


def test_long_prompt_does_not_stall_running_requests(tiny_model_dir, start_daemon):
    """With chunked prefill, a running request streams while a long prompt is fed in pieces."""
    d = start_daemon(tiny_model_dir, "--slots", "2", "--policy", "fifo", "--prefill-chunk", "16")
    with d.client() as c:
        runner = c.submit("keep talking", max_tokens=120)
        events = c.events(runner)
        while next(events).event != "token":
            pass
        long_prompt = " ".join(f"word{i}" for i in range(300))  # several hundred tokens: many chunks
        big = c.submit(long_prompt, max_tokens=2)
        big_events = list(c.events(big))
        rest = list(events)
    accepted_seq = big_events[0].seq
    first_big_token = next(e.seq for e in big_events if e.event == "token")
    streamed_meanwhile = [e for e in rest if e.event == "token" and accepted_seq < e.seq < first_big_token]
    assert big_events[-1].event == "done" and big_events[-1].data["usage"]["prompt_tokens"] > 16 * 8
    assert len(streamed_meanwhile) >= 8  # roughly one token of the runner per prefill chunk
