"""``n`` choices: one fork group of requests whose shared prompt is prefilled once; each choice reproducible by seed."""

from __future__ import annotations

import asyncio

from tests.conftest import messages

PROMPT = "Write a short poem about the sea, the wind and the rain."


def test_a_fork_group_prefills_its_prompt_once(start_daemon, tiny_model_dir):
    d = start_daemon(tiny_model_dir, "--slots", "4")

    async def go():
        async with d.aclient() as c:
            return await asyncio.gather(*(c.chat(messages(PROMPT), max_tokens=8, min_tokens=8, fork="g", seed=i,
                                                 temperature=1.0) for i in range(4)))  # fmt: skip

    rs = asyncio.run(go())
    prompt = rs[0].usage["prompt_tokens"]
    computed = [r.stats["prompt_tokens_computed"] for r in rs]
    assert sum(computed) == prompt and sorted(computed) == [0, 0, 0, prompt]
    assert sum(r.stats["prompt_tokens_reused"] for r in rs) == 3 * prompt
    assert len({r.text for r in rs}) > 1  # seeds 0..3: different choices


def test_n_choices_over_http_are_reproducible_streamed_and_not(start_daemon, tiny_model_dir):
    d = start_daemon(tiny_model_dir, "--slots", "4", "--http", "127.0.0.1:0")
    client = d.openai()
    model = client.models.list().data[0].id
    kw = {"model": model, "messages": messages(PROMPT), "max_tokens": 8, "n": 4, "seed": 11, "temperature": 1.0,
          "extra_body": {"min_tokens": 8}}  # fmt: skip
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2, 3] and texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1 and a.usage.completion_tokens == 32
    assert sum(s["prompt_tokens_computed"] for s in a.model_extra["quantad"]["stats"]) == a.usage.prompt_tokens
    streamed = ["", "", "", ""]
    for ch in client.chat.completions.create(**kw, stream=True):
        for choice in ch.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts
