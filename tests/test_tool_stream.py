"""Tool calls stream as deltas, no call markup reaches content or a token's text; agent loops survive preemption."""

from __future__ import annotations

import asyncio
import json

import pytest

from backends.structured import parse_tool_calls
from ipc import protocol as P
from ipc.tool_stream import TOOL_OPEN, deltas, split
from tests.conftest import DaemonProc, messages
from tests.test_structured import WEATHER

NAMES = {"get_weather"}
TEXT = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "at": {"h": 9}}}</tool_call>'
        ' <tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{"name": "get_weather", '
        '"arguments": {"city": "Oslo"}}</tool_call> <tool')  # fmt: skip


def _replay(text: str, step: int) -> tuple[str, dict]:
    """What a follower assembles from the text growing ``step`` characters at a time."""
    old, content, calls = split("", NAMES), "", {}
    for n in [*range(step, len(text), step), len(text)]:
        new = split(text[:n], NAMES, final=n == len(text))
        assert new.content.startswith(old.content)
        content += new.content[len(old.content) :]
        for d in deltas(old, new, 7):
            c = calls.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in d:
                c["id"], c["name"] = d["id"], d["function"]["name"]
            c["arguments"] += d["function"]["arguments"]
        old = new
    return content, calls


@pytest.mark.parametrize("step", [1, 3, 17, 1000])
def test_a_growing_text_splits_into_the_calls_the_worker_parses(step):
    content, calls = _replay(TEXT, step)
    final, parsed = parse_tool_calls(TEXT, [WEATHER], 7)
    assert TOOL_OPEN[:4] not in content.replace(" <tool", "") and content.strip() == final
    assert [(c["id"], c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (p["id"], p["function"]["name"], json.loads(p["function"]["arguments"])) for p in parsed
    ]


@pytest.fixture(scope="module")
def front(tiny_model_dir, tmp_path_factory):
    d = DaemonProc(tiny_model_dir, tmp_path_factory.mktemp("tools"), "--slots", "2", "--quantum-tokens", "3",
                   "--http", "127.0.0.1:0")  # fmt: skip
    yield d
    d.stop()


def test_a_forced_call_streams_as_deltas_on_the_protocol(front):
    with front.client(timeout=300) as c:
        events = list(c.chat("Weather in Rome?", tools=[WEATHER], tool_choice="required", max_tokens=60, stream=True))
    done = events[-1].data
    assert done["finish_reason"] == "tool_calls"
    shown = "".join(ev.text for ev in events if ev.event == P.EV_TOKEN)
    assert "<tool" not in shown and "</tool" not in shown
    deltas_ = [ev.data["tool_call"] for ev in events if ev.event == P.EV_TOOL_CALL]
    assert deltas_[0]["id"] == done["tool_calls"][0]["id"] and deltas_[0]["function"]["name"] == "get_weather"
    args = "".join(d["function"]["arguments"] for d in deltas_)
    assert json.loads(args) == json.loads(done["tool_calls"][0]["function"]["arguments"])
    assert len(deltas_) > 2  # the arguments came in pieces, not at the end


def test_the_openai_sdk_assembles_streamed_tool_calls(front):
    client = front.openai()
    model = client.models.list().data[0].id
    kw = {"model": model, "messages": messages("Weather in Oslo?"), "tools": [WEATHER], "tool_choice": "required",
          "max_tokens": 60}  # fmt: skip
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    name, args, content = "", "", ""
    for ch in chunks:
        delta = ch.choices[0].delta if ch.choices else None
        content += (delta.content or "") if delta else ""
        for tc in (delta.tool_calls or []) if delta else []:
            name += tc.function.name or ""
            args += tc.function.arguments or ""
    assert "<tool" not in content and whole.message.content is None
    assert name == whole.message.tool_calls[0].function.name
    assert json.loads(args) == json.loads(whole.message.tool_calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


CITIES = ("Paris", "Rome")


async def _agent(d, who: int) -> list:
    """Two rounds of: ask, a forced tool call, its result, an answer from it (the second reads the first's)."""
    transcript: list = []
    async with d.aclient() as c:
        convo: list = []
        for r, city in enumerate(CITIES):
            convo.append({"role": "user", "content": f"Agent {who}, round {r}: what is the weather in {city}?"})
            call = await c.chat(convo, tools=[WEATHER], tool_choice="required", max_tokens=40)
            convo.append({"role": "assistant", "content": None, "tool_calls": call.tool_calls})
            result = {"city": city, "sky": "sunny" if r % 2 else "rain", "celsius": 10 + r}
            convo.append({"role": "tool", "tool_call_id": call.tool_calls[0]["id"], "content": json.dumps(result)})
            answer = await c.chat(convo, tools=[WEATHER], max_tokens=24)
            convo.append({"role": "assistant", "content": answer.content or ""})
            transcript.append((call.tool_calls[0]["function"], answer.text, answer.content))
            assert "<tool_call>" not in (answer.content or "")
    return transcript


async def _agents(d, n: int) -> list:
    return await asyncio.gather(*(_agent(d, i) for i in range(n)))


@pytest.mark.slow
def test_an_agent_loop_is_the_same_when_preempted(smollm2_dir, start_daemon):
    alone = start_daemon("smollm2", "--backend", "hf", "--policy", "fifo")
    want = [asyncio.run(_agents(alone, 1))[0], asyncio.run(_agent_one(alone))]
    d = start_daemon("smollm2", "--backend", "hf", "--slots", "1", "--quantum-tokens", "3")
    got = asyncio.run(_agents(d, 2))
    with d.client(timeout=30) as c:
        assert c.stats()["preemptions"] > 0
    assert got == want
    first = want[0][0]
    assert json.loads(first[0]["arguments"]) == {"city": "Paris"}


async def _agent_one(d) -> list:
    return await _agent(d, 1)
