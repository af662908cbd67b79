"""Sampling controls (logit bias, penalties, top_k, min_p) are applied and survive preemption; unknown fields refused.

The formula is checked on real logits against vLLM's definitions written out by hand; the
behaviour through a real daemon and the real OpenAI client.
"""

from __future__ import annotations

import collections

import openai
import pytest
import torch

from backends.sampling import choose, shape
from ipc.chat_params import parse_chat
from ipc.client import ClientError, result_of
from ipc.protocol import ProtocolError
from tests.conftest import PROMPTS, messages

TOKENS = 24


def test_shape_follows_the_definitions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g)
    prompt, out = [1, 2, 3], [3, 7, 7, 7, 9]
    p = {"logit_bias": {"4": 5.0}, "repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.25}
    want = logits.reshape(-1).clone()
    want[4] += 5.0
    for t in {1, 2, 3, 7, 9}:
        want[t] = want[t] / 1.3 if want[t] > 0 else want[t] * 1.3
    for t, n in collections.Counter(out).items():
        want[t] -= 0.5 * n + 0.25
    assert torch.allclose(shape(logits, p, prompt, out), want)
    assert torch.equal(logits, torch.randn(1, 50, generator=torch.Generator().manual_seed(0)))  # input kept


def test_top_k_and_min_p_keep_only_the_likely_tokens():
    logits = torch.tensor([2.0, 1.9, 1.0, 0.5, 0.0])  # min_p 0.5 keeps e^-0.1 = 0.90 of the top, drops e^-1
    picks = {choose(logits, 1.0, 1.0, seed, 0, top_k=2) for seed in range(200)}
    assert picks == {0, 1}
    picks = {choose(logits, 1.0, 1.0, seed, 0, min_p=0.5) for seed in range(200)}
    assert picks == {0, 1}
    assert len({choose(logits, 1.0, 1.0, seed, 0) for seed in range(200)}) > 2


def test_controls_are_validated():
    base = {"messages": messages("x")}
    assert "frequency_penalty" not in parse_chat(base)  # neutral values are not kept
    assert parse_chat({**base, "top_k": -1}).get("top_k") is None
    assert parse_chat({**base, "logit_bias": {"5": -100}})["logit_bias"] == {"5": -100.0}
    for bad in ({"frequency_penalty": 3}, {"logit_bias": {"x": 1}}, {"logit_bias": {"5": 101}}, {"min_p": 2}):
        with pytest.raises(ProtocolError, match="bad_field|out of range|logit_bias"):
            parse_chat({**base, **bad})
    with pytest.raises(ProtocolError) as refused:
        parse_chat({**base, "n": 3})
    assert refused.value.code == "unsupported_parameter"


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory):
    from tests.conftest import DaemonProc

    d = DaemonProc(tiny_model_dir, tmp_path_factory.mktemp("controls"), "--slots", "2", "--http", "127.0.0.1:0")
    yield d
    d.stop()


def _ids(d, prompt: str, tokens: int = TOKENS, **kw) -> list[int]:
    with d.client(timeout=300) as c:
        return c.chat(messages(prompt), max_tokens=tokens, min_tokens=tokens, **kw).token_ids


def test_logit_bias_and_penalties_change_the_output(daemon):
    plain = _ids(daemon, PROMPTS[0])
    forced = _ids(daemon, PROMPTS[0], logit_bias={str(plain[0] + 1): 100})
    assert forced == [plain[0] + 1] * TOKENS
    banned = _ids(daemon, PROMPTS[0], logit_bias={str(plain[0]): -100})
    assert banned[0] != plain[0]


def test_penalties_stop_the_real_model_repeating_itself(smollm2_dir, start_daemon):
    """SmolLM2 counting repeats its separators: a frequency penalty thins them out, as vLLM's does."""
    d = start_daemon(smollm2_dir, "--slots", "1")
    prompt = "Count from one to twenty in digits, separated by commas."
    plain = _ids(d, prompt, 40)
    penalised = _ids(d, prompt, 40, frequency_penalty=1.5)
    top = collections.Counter(plain).most_common(1)[0]
    assert top[1] >= 5, "the reference output should repeat a token"
    assert penalised != plain and collections.Counter(penalised)[top[0]] < top[1]


def test_controls_are_exact_across_preemption(daemon, start_daemon, tiny_model_dir):
    kw = {"frequency_penalty": 1.0, "repetition_penalty": 1.2, "temperature": 0.8, "top_k": 20, "min_p": 0.05,
          "seed": 7}  # fmt: skip
    alone = [_ids(daemon, p, **kw) for p in PROMPTS[:3]]
    d = start_daemon(tiny_model_dir, "--slots", "1", "--quantum-tokens", "2")
    with d.client(timeout=300) as c:
        cids = [c.submit(messages(p), max_tokens=TOKENS, min_tokens=TOKENS, **kw) for p in PROMPTS[:3]]
        results = [result_of(list(c.events(cid))) for cid in cids]
    assert [r.token_ids for r in results] == alone
    assert sum(r.stats["preemptions"] for r in results) > 0


def test_the_http_front_takes_the_controls_and_refuses_unknown_fields(daemon):
    client = daemon.openai()
    model = client.models.list().data[0].id
    plain = _ids(daemon, PROMPTS[1])
    r = client.chat.completions.create(model=model, messages=messages(PROMPTS[1]), max_tokens=4,
                                       logit_bias={str(plain[0] + 1): 100})  # fmt: skip
    with daemon.client(timeout=60) as c:
        want = c.chat(messages(PROMPTS[1]), max_tokens=4, logit_bias={str(plain[0] + 1): 100}).text
    assert r.choices[0].message.content == want
    vllm = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1}
    extra = client.chat.completions.create(model=model, messages=messages(PROMPTS[1]), max_tokens=4, extra_body=vllm)
    assert extra.choices[0].finish_reason == "length"
    for kw, name in (({"n": 9}, "n"), ({"extra_body": {"best_of": 2}}, "best_of")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=model, messages=messages("x"), max_tokens=2, **kw)
        assert refused.value.body["code"] == "unsupported_parameter" and refused.value.body["param"] == name
    with daemon.client(timeout=30) as c, pytest.raises(ClientError, match="unsupported_parameter"):
        c.chat(messages("x"), n=2)
