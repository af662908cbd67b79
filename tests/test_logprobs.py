"""Logprobs: the model's own, per token, streamed and in ``done``, unchanged by preemption, through real clients."""

from __future__ import annotations

import math

import pytest

from ipc.client import ClientError, result_of
from tests.conftest import PROMPTS, DaemonProc, messages

TOKENS = 12


def _chat(d, prompt: str, **kw):
    with d.client(timeout=300) as c:
        return c.chat(messages(prompt), max_tokens=TOKENS, min_tokens=TOKENS, logprobs=True, top_logprobs=3, **kw)


def _check(r) -> None:
    lps = r.events[-1].data["logprobs"]
    assert len(lps) == len(r.token_ids) == TOKENS
    streamed = [e for ev in r.events if ev.event == "token" for e in ev.data.get("logprobs", [])]
    assert streamed == lps
    for e in lps:
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 3 and e["bytes"] == list(e["token"].encode())
        best = e["top_logprobs"][0]  # greedy: the chosen token is the model's most likely one
        assert best["token"] == e["token"] and math.isclose(best["logprob"], e["logprob"])
        ranked = [t["logprob"] for t in e["top_logprobs"]]
        assert ranked == sorted(ranked, reverse=True)


@pytest.fixture(scope="module")
def alone(tiny_model_dir, tmp_path_factory):
    d = DaemonProc(tiny_model_dir, tmp_path_factory.mktemp("lp-alone"), "--policy", "fifo", "--http", "127.0.0.1:0")
    yield d
    d.stop()


def test_logprobs_stream_per_token_and_come_whole_in_done(alone):
    _check(_chat(alone, PROMPTS[0]))
    with alone.client(timeout=60) as c, pytest.raises(ClientError, match="top_logprobs"):
        c.chat(messages("x"), top_logprobs=2)


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_logprobs_are_the_same_when_preempted_every_two_tokens(alone, start_daemon, tiny_model_dir, tier):
    want = [_chat(alone, p).events[-1].data["logprobs"] for p in PROMPTS[:3]]
    d = start_daemon(tiny_model_dir, "--slots", "1", "--quantum-tokens", "2", "--snapshot-tier", tier)
    with d.client(timeout=300) as c:
        cids = [c.submit(messages(p), max_tokens=TOKENS, min_tokens=TOKENS, logprobs=True, top_logprobs=3)
                for p in PROMPTS[:3]]  # fmt: skip
        got = [result_of(list(c.events(cid))) for cid in cids]
    assert sum(r.stats["preemptions"] for r in got) > 0
    assert [r.events[-1].data["logprobs"] for r in got] == want


def test_the_openai_sdk_reads_logprobs_streamed_and_not(alone):
    client = alone.openai()
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=messages(PROMPTS[1]), max_tokens=6, logprobs=True,
                                       top_logprobs=2)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 for t in content)
    chunks = list(client.chat.completions.create(model=model, messages=messages(PROMPTS[1]), max_tokens=6,
                                                 logprobs=True, top_logprobs=2, stream=True))  # fmt: skip
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in content]


def test_langchain_asks_for_logprobs(alone):
    from langchain_openai import ChatOpenAI

    client = alone.openai()
    model = client.models.list().data[0].id
    llm = ChatOpenAI(model=model, base_url=alone.urls["http"] + "/v1", api_key="x", max_tokens=6, logprobs=True,
                     temperature=0)  # fmt: skip
    msg = llm.invoke("Say hello.")
    lps = msg.response_metadata["logprobs"]["content"]
    assert len(lps) == msg.usage_metadata["output_tokens"] and all("logprob" in t for t in lps)


def test_the_llama_cpp_engine_reports_logprobs_too(start_daemon):
    pytest.importorskip("llama_cpp")
    from backends.model_store import default_gguf

    d = start_daemon(default_gguf(), "--backend", "llamacpp", "--threads", "1")
    _check(_chat(d, PROMPTS[2]))
