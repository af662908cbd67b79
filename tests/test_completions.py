"""``/v1/completions`` and the protocol's ``prompt``: a text continued as is, scheduled and preempted as chats are."""

from __future__ import annotations

import openai
import pytest

from ipc.client import ClientError, result_of
from tests.conftest import DaemonProc

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def front(tiny_model_dir, tmp_path_factory):
    d = DaemonProc(tiny_model_dir, tmp_path_factory.mktemp("cmpl"), "--policy", "fifo", "--http", "127.0.0.1:0")
    yield d
    d.stop()


def test_a_prompt_is_continued_without_the_chat_template(front):
    with front.client(timeout=120) as c:
        ids = c.tokenize(PROMPTS[0])["tokens"]
        r = c.complete(PROMPTS[0], max_tokens=8, min_tokens=8)
        assert r.usage["prompt_tokens"] == len(ids) and r.usage["completion_tokens"] == 8
        assert c.complete(ids, max_tokens=8, min_tokens=8).text == r.text  # ids or text: the same prompt
        chat = c.chat(PROMPTS[0], max_tokens=8, min_tokens=8)
        assert chat.usage["prompt_tokens"] > len(ids)  # a chat adds its template
        with pytest.raises(ClientError) as bad:
            c.complete([10**9], max_tokens=2)
        assert bad.value.code == "bad_field"
        with pytest.raises(ClientError) as long:
            c.complete([1] * 3000, max_tokens=2)
        assert long.value.code == "context_length_exceeded"


def test_completions_are_the_same_when_preempted(front, start_daemon, tiny_model_dir):
    with front.client(timeout=300) as c:
        want = [c.complete(p, max_tokens=10, min_tokens=10).text for p in PROMPTS]
    d = start_daemon(tiny_model_dir, "--slots", "1", "--quantum-tokens", "2")
    with d.client(timeout=300) as c:
        cids = [c.submit(None, prompt=p, max_tokens=10, min_tokens=10) for p in PROMPTS]
        got = [result_of(list(c.events(cid))) for cid in cids]
    assert [r.text for r in got] == want and sum(r.stats["preemptions"] for r in got) > 0


def test_the_openai_sdk_completes_streamed_and_not(front):
    client = front.openai()
    model = client.models.list().data[0].id
    with front.client(timeout=60) as c:
        want = c.complete(PROMPTS[1], max_tokens=6, min_tokens=6).text
    r = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=6, extra_body={"min_tokens": 6})
    assert r.object == "text_completion" and r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    chunks = list(client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=6, stream=True,
                                            extra_body={"min_tokens": 6}))  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    echoed = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=6, echo=True, logprobs=2,
                                       extra_body={"min_tokens": 6})  # fmt: skip
    lp = echoed.choices[0].logprobs
    assert echoed.choices[0].text == PROMPTS[1] + want and "".join(lp.tokens) == want
    assert lp.text_offset[0] == len(PROMPTS[1]) and all(len(t) == 2 for t in lp.top_logprobs)
    assert r.choices[0].logprobs is None
    for kw, name in (({"suffix": "end"}, "suffix"), ({"n": 2}, "n"), ({"best_of": 3}, "best_of")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=model, prompt="x", max_tokens=2, **kw)
        assert refused.value.body["code"] == "unsupported_parameter" and refused.value.body["param"] == name
