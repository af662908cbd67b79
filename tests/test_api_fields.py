"""OpenAI fields that only label a request, and vLLM's and llama-server's extras, through a real daemon's HTTP front.

A label (``store``, ``metadata``, ``service_tier``, ...) is accepted and changes nothing; an extra that
changes the output does what it does on vLLM: ``ignore_eos`` runs to ``max_tokens``;
``chat_template_kwargs`` and ``reasoning_effort`` reach the model's chat template.  A field that would
change the output and is not supported is still refused by name.
"""

from __future__ import annotations

import shutil

import openai
import pytest

from ipc import protocol as P
from ipc.chat_params import parse_chat
from tests.conftest import messages

LABELS = {"store": False, "metadata": {"run": "7"}, "service_tier": "auto", "prompt_cache_key": "k1",
          "safety_identifier": "user-1", "cache_prompt": True, "user": "someone"}  # fmt: skip
# a template that shows what it is given: the variables' text comes before the conversation
TEMPLATE_HEAD = (
    "{% if shout %}LOUD LOUD LOUD LOUD {% endif %}{% if reasoning_effort %}effort {{ reasoning_effort }} {% endif %}"
)


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory):
    """The tiny model with a chat template that prints its variables, behind the HTTP front."""
    from tests.conftest import DaemonProc

    model = tmp_path_factory.mktemp("templated") / "model"
    shutil.copytree(tiny_model_dir, model)
    template = model / "chat_template.jinja"
    template.write_text(TEMPLATE_HEAD + template.read_text())
    d = DaemonProc(model, tmp_path_factory.mktemp("fields"), "--slots", "2", "--http", "127.0.0.1:0")
    d.model_id = model.name
    yield d
    d.stop()


def _eos(tiny_model_dir) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id


def test_labels_are_accepted_and_change_nothing(daemon):
    client = daemon.openai()
    ask = {"model": daemon.model_id, "messages": messages("labels"), "max_tokens": 4}
    plain = client.chat.completions.create(**ask)
    labelled = client.chat.completions.create(**ask, extra_body=LABELS)
    assert labelled.choices[0].message.content == plain.choices[0].message.content
    text = client.completions.create(model=daemon.model_id, prompt="labels", max_tokens=3)
    labelled = client.completions.create(model=daemon.model_id, prompt="labels", max_tokens=3, extra_body=LABELS)
    assert labelled.choices[0].text == text.choices[0].text
    for body in ({"prediction": {"type": "content", "content": "x"}}, {"audio": {"voice": "alloy"}}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**ask, extra_body=body)
        name = next(iter(body))
        assert refused.value.body["code"] == "unsupported_parameter" and refused.value.body["param"] == name


def test_ignore_eos_runs_to_max_tokens(daemon, tiny_model_dir):
    client = daemon.openai()
    eos_first = {str(_eos(tiny_model_dir)): 100}  # the end of sequence is the only likely token
    ask = {"model": daemon.model_id, "messages": messages("stop at once"), "max_tokens": 6, "logit_bias": eos_first}
    ended = client.chat.completions.create(**ask)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 1
    on = client.chat.completions.create(**ask, extra_body={"ignore_eos": True})
    assert on.choices[0].finish_reason == "length" and on.usage.completion_tokens == 6
    done = client.completions.create(model=daemon.model_id, prompt="stop at once", max_tokens=5,
                                     logit_bias=eos_first, extra_body={"ignore_eos": True})  # fmt: skip
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5


def test_chat_template_kwargs_and_reasoning_effort_reach_the_template(daemon):
    client = daemon.openai()
    ask = {"model": daemon.model_id, "messages": messages("template"), "max_tokens": 1}
    plain = client.chat.completions.create(**ask).usage.prompt_tokens
    loud = client.chat.completions.create(**ask, extra_body={"chat_template_kwargs": {"shout": True}})
    effort = client.chat.completions.create(**ask, reasoning_effort="low")
    assert loud.usage.prompt_tokens > plain and effort.usage.prompt_tokens > plain
    quiet = client.chat.completions.create(**ask, extra_body={"chat_template_kwargs": {"shout": False}})
    assert quiet.usage.prompt_tokens == plain
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**ask, extra_body={"chat_template_kwargs": {"tokenize": True}})
    assert refused.value.body["code"] == P.E_BAD_FIELD
    with daemon.client(timeout=60) as c:  # the same through the protocol
        direct = c.chat(messages("template"), max_tokens=1, chat_template_kwargs={"shout": True})
    assert direct.usage["prompt_tokens"] == loud.usage.prompt_tokens


def test_extras_are_checked_where_the_chat_comes_in():
    base = {"op": "chat", "id": 1, "messages": messages("hi")}
    assert parse_chat(base | {"ignore_eos": True}).ignore_eos is True
    assert parse_chat(base | {"reasoning_effort": "high"}).template_kwargs == {"reasoning_effort": "high"}
    for bad in ({"ignore_eos": 1}, {"reasoning_effort": "max"}, {"chat_template_kwargs": {"add_generation_prompt": 0}},
                {"chat_template_kwargs": {"not a name": 1}}, {"chat_template_kwargs": []}):  # fmt: skip
        with pytest.raises(P.ProtocolError) as err:
            parse_chat(base | bad)
        assert err.value.code == P.E_BAD_FIELD, bad
    with pytest.raises(P.ProtocolError, match="need 'messages'"):
        parse_chat({"op": "chat", "id": 1, "prompt": "x", "chat_template_kwargs": {"a": 1}})
