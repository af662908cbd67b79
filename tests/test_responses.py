"""OpenAI's Responses API on the HTTP front, driven by the official ``openai`` SDK against a real daemon.

One daemon (the tiny model, one slot, a 2-token quantum: responses preempt each other like chats).
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from ipc import protocol as P
from tests.conftest import messages
from tests.test_structured import SCHEMA, WEATHER

TOOL = {"type": "function", **WEATHER["function"]}  # the Responses API's flat function tool


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory):
    from tests.conftest import DaemonProc

    d = DaemonProc(tiny_model_dir, tmp_path_factory.mktemp("responses"), "--slots", "1", "--quantum-tokens", "2",
                   "--http", "127.0.0.1:0")  # fmt: skip
    d.model_id = tiny_model_dir.name
    yield d
    d.stop()


def test_a_response_is_the_chat_of_its_input(daemon):
    client = daemon.openai()
    r = client.responses.create(model=daemon.model_id, input="Name a color.", instructions="Be brief.",
                                max_output_tokens=8)  # fmt: skip
    with daemon.client(timeout=60) as c:
        chat = c.chat([{"role": "system", "content": "Be brief."}, *messages("Name a color.")], max_tokens=8)
    assert r.object == "response" and r.id.startswith("resp_") and r.output_text == chat.text
    assert r.status == ("incomplete" if chat.finish_reason == "length" else "completed")
    assert (
        r.usage.input_tokens == chat.usage["prompt_tokens"] and r.usage.output_tokens == chat.usage["completion_tokens"]
    )
    assert r.usage.input_tokens_details.cached_tokens >= 0


def test_a_streamed_response_sends_the_semantic_events_in_order(daemon):
    client = daemon.openai()
    events = list(client.responses.create(model=daemon.model_id, input="Count to five.", max_output_tokens=10,
                                          stream=True))  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text and final.output_text == text and final.usage.output_tokens == 10
    assert kinds.index("response.output_item.added") < kinds.index("response.output_text.delta")
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 1


def test_a_function_tool_and_its_output_make_a_round_trip(daemon):
    client = daemon.openai()
    ask = {"model": daemon.model_id, "tools": [TOOL], "max_output_tokens": 40}
    r = client.responses.create(input="Weather in Paris?", tool_choice="required", **ask)
    calls = [item for item in r.output if item.type == "function_call"]
    assert (
        calls and calls[0].name == "get_weather" and json.loads(calls[0].arguments)["city"] in ("Paris", "Rome", "Oslo")
    )
    streamed = list(client.responses.create(input="Weather in Paris?", tool_choice="required", stream=True, **ask))
    args = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert done and done[0].arguments == args == calls[0].arguments  # greedy: the same call
    turn = [{"role": "user", "content": "Weather in Paris?"}, calls[0].model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}]  # fmt: skip
    answer = client.responses.create(input=turn, tool_choice="none", **ask)
    assert answer.status in ("completed", "incomplete") and answer.output[0].type == "message"


def test_text_format_json_schema_is_held_to_its_schema(daemon):
    client = daemon.openai()
    fmt = {"format": {"type": "json_schema", "name": "reply", "schema": SCHEMA, "strict": True}}
    r = client.responses.create(model=daemon.model_id, input="Answer in JSON.", text=fmt, max_output_tokens=60)
    jsonschema.validate(json.loads(r.output_text), SCHEMA)


def test_bad_input_is_a_4xx_and_the_daemon_keeps_serving(daemon):
    client = daemon.openai()
    bad = [
        ({"input": [{"type": "computer_call", "id": "x"}]}, P.E_UNSUPPORTED),
        ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, P.E_BAD_FIELD),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, P.E_BAD_FIELD),
    ]
    for body, code in bad:
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model=daemon.model_id, max_output_tokens=2, **body)
        assert err.value.body["code"] == code, body
    assert (
        client.responses.create(model=daemon.model_id, input="still here?", max_output_tokens=2).usage.output_tokens
        == 2
    )
