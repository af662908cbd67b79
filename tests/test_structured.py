"""JSON, JSON-schema and tool calls on the HF backend: constrained decoding survives preemption."""

import asyncio
import json

import jsonschema
import pytest

from ipc.client import ClientError
from tests.conftest import messages

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["answer", "count", "tags"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
PROMPTS = [f"Question {i}: is it raining?" for i in range(6)]


async def ask_all(d, **kw):
    async with d.aclient() as c:
        return await asyncio.gather(*(c.chat(messages(p), max_tokens=60, **kw) for p in PROMPTS))


@pytest.fixture(scope="module")
def unpreempted(tiny_model_dir, tmp_path_factory):
    from tests.conftest import DaemonProc

    d = DaemonProc(tiny_model_dir, tmp_path_factory.mktemp("json-fifo"), "--policy", "fifo")
    try:
        return [r.text for r in asyncio.run(ask_all(d, response_format=FORMAT))]
    finally:
        d.stop()


def test_json_schema_output_validates_and_survives_preemption(tiny_model_dir, start_daemon, unpreempted):
    d = start_daemon(tiny_model_dir, "--slots", "3", "--quantum-tokens", "2")
    results = asyncio.run(ask_all(d, response_format=FORMAT))
    for r in results:
        jsonschema.validate(json.loads(r.text), SCHEMA)
        assert r.finish_reason == "stop"
        assert r.stats["preemptions"] > 0
    assert [r.text for r in results] == unpreempted


def test_json_object_and_seeded_sampling_stay_valid(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--slots", "2", "--quantum-tokens", "3", "--snapshot-tier", "disk")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}}, "required": ["n"],
              "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    results = asyncio.run(ask_all(d, response_format=fmt, temperature=1.0, seed=7))
    for r in results:
        jsonschema.validate(json.loads(r.text), schema)


def test_required_tool_call_is_well_formed(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--quantum-tokens", "2")
    with d.client() as c:
        r = c.chat("What is the weather in Paris?", tools=[WEATHER], tool_choice="required", max_tokens=60)
        pick = {"type": "function", "function": {"name": "get_weather"}}
        named = c.chat("Weather?", tools=[WEATHER], tool_choice=pick, max_tokens=60)
        with pytest.raises(ClientError) as bad:
            c.chat("x", tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert bad.value.code == "bad_field"
    for res in (r, named):
        assert res.finish_reason == "tool_calls" and res.content is None
        (call,) = res.tool_calls
        assert call["type"] == "function" and call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome", "Oslo")


@pytest.mark.slow
def test_smollm2_calls_a_tool_and_reads_its_result(smollm2_dir, start_daemon):
    d = start_daemon("smollm2", "--backend", "hf", "--quantum-tokens", "4")
    convo = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    with d.client() as c:
        r = c.chat(convo, tools=[WEATHER], tool_choice="required", max_tokens=40)
        (call,) = r.tool_calls
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        convo += [
            {"role": "assistant", "content": None, "tool_calls": r.tool_calls},
            {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "sunny", "celsius": 21}'},
        ]
        answer = c.chat(convo, tools=[WEATHER], max_tokens=40)
    assert answer.finish_reason in ("stop", "length") and answer.text


def test_schemas_are_closed_to_properties_they_do_not_name():
    from backends.structured import closed

    open_schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}}},
                   "$defs": {"x": {"properties": {"y": {}}}}, "items": {"properties": {}}}  # fmt: skip
    shut = closed(open_schema)
    assert shut["additionalProperties"] is False and shut["properties"]["a"]["additionalProperties"] is False
    assert shut["$defs"]["x"]["additionalProperties"] is False and shut["items"]["additionalProperties"] is False
    assert closed({"type": "object"}) == {"type": "object"}  # json_object: any keys
    kept = {"properties": {"a": {}}, "additionalProperties": {"type": "integer"}}
    assert closed(kept) == kept
    both = closed({"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]})
    assert all("additionalProperties" not in m for m in both["allOf"]) and "additionalProperties" not in both


def test_json_object_is_closed_before_max_tokens_and_survives_preemption(tiny_model_dir, start_daemon):
    """The random tiny model never closes an object itself: the budget's last tokens do, the same when preempted."""
    fmt = {"type": "json_object"}
    outs = []
    for flags in (("--policy", "fifo"), ("--slots", "2", "--quantum-tokens", "2")):
        d = start_daemon(tiny_model_dir, *flags)
        outs.append(asyncio.run(ask_all(d, response_format=fmt)))
    alone, preempted = outs
    for r in preempted:
        assert isinstance(json.loads(r.text), dict), r.text
        assert r.finish_reason == "length" and r.stats["grammar_closed_early"] and r.stats["grammar_complete"]
    assert sum(r.stats["preemptions"] for r in preempted) > 0
    assert [r.text for r in preempted] == [r.text for r in alone]


@pytest.mark.slow
def test_smollm2_keeps_to_the_schema_without_additional_properties(smollm2_dir, start_daemon):
    d = start_daemon("smollm2", "--backend", "hf")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    with d.client(timeout=300) as c:
        r = c.chat("Describe a person called Ann, aged 31, as JSON.", response_format=fmt, max_tokens=48)
    assert r.finish_reason == "stop" and set(json.loads(r.text)) == {"name", "age"}, r.text
