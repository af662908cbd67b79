"""The API worker against a server that enforces tools and JSON: llama.cpp's, from ``llama-cpp-python``.

``transformers serve`` accepts ``tools`` and ``response_format`` without enforcing them;
llama.cpp's server compiles both into grammars.  It serves the default model's GGUF with
the template stored in the GGUF (the one ``--tokenizer`` renders locally), so a request
resumed over ``/v1/completions`` reads the same prompt as an uninterrupted one.

What this server can and cannot do, as detected and asserted here: it accepts and ignores
``continue_final_message`` (so the resume method is ``completions``); it refuses
``{"type": "json_schema"}`` (500) but enforces a schema given inline with ``json_object``;
it streams a forced tool call (``tool_choice`` naming a function) but not an automatic one.
Server-side grammars restart at every stream, so JSON requests and tool calls are not
preemptible on it: they run to the end of their turn while a competitor waits.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from benchmarks.harness.servers import HttpServer, free_port
from ipc.client import result_of
from tests.conftest import messages
from tests.test_openai_backend import api_flags, check_stream, common_prefix

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is installed by `make test`")
pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}  # fmt: skip
FORMATS = {
    "json_object": {"type": "json_object"},
    "json_schema": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
}
JSON_PROMPT = "Give a person as a JSON object with a name and an age."
COMPETITOR = "Tell me a long story about a dragon."


class LlamaCppServer(HttpServer):
    """``python -m llama_cpp.server`` on a free loopback port, ready once it listens and lists its model."""

    def __init__(self, gguf: Path, log_path: Path, timeout: float = 120.0):
        port = free_port()
        # One request at a time, queued (not interrupted by the next); greedy requests need no seed,
        # but a fixed one keeps sampled ones repeatable.  Default chat format: the GGUF's own template.
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--seed", "0",
               "--interrupt_requests", "False"]  # fmt: skip
        super().__init__("llama_cpp.server", cmd, port, log_path, timeout)
        if self.model != "smollm2":
            self.stop()
            raise RuntimeError(f"llama_cpp.server serves {self.model!r}, not the alias smollm2")

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url, api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Iterator[LlamaCppServer]:
    from backends.model_store import default_gguf

    s = LlamaCppServer(default_gguf(), tmp_path_factory.mktemp("llamacpp") / "server.log")
    yield s
    s.stop()


def daemon(start_daemon, llama: LlamaCppServer, smollm2_dir: Path):
    """One slot, so a waiting request makes the daemon preempt at every 2-token quantum end it can."""
    flags = api_flags(llama.url, "--tokenizer", str(smollm2_dir), "--quantum-tokens", "2", "--slots", "1")
    return start_daemon(llama.model, *flags)


# ---- what the server supports ------------------------------------------------------------------------------------
def test_resume_method_detected_despite_ignored_continue_final_message(llama, smollm2_dir):
    """The prefix probe is accepted, but the prompt shows the message was not continued."""
    from backends.continuation import COMPLETIONS, NONE, LocalTemplate
    from backends.openai_endpoint import Endpoint

    chat = [*messages("Say OK."), {"role": "assistant", "content": "O"}]
    with llama.client() as c:  # accepted: an unknown field is ignored, not refused
        extra = {"continue_final_message": True, "add_generation_prompt": False}
        c.chat.completions.create(model=llama.model, messages=chat, max_tokens=1, extra_body=extra)

    async def detect(template):
        ep = Endpoint(llama.url, llama.model, "x", 60.0, template=template)
        try:
            return await ep.resume_method()
        finally:
            await ep.close()

    assert asyncio.run(detect(LocalTemplate(str(smollm2_dir)))) == COMPLETIONS
    assert asyncio.run(detect(None)) == NONE


def test_preempted_text_resumes_over_completions_with_nothing_lost(llama, smollm2_dir, start_daemon):
    d = daemon(start_daemon, llama, smollm2_dir)
    target = "Say hello."
    with d.client() as c:
        competitor = c.submit(messages(COMPETITOR), max_tokens=30)
        events = list(c.chat(messages(target), stream=True, max_tokens=12))
        list(c.events(competitor))
        workers = c.ps()["workers"]
    text, boundaries = check_stream(events)
    stats = events[-1].data["stats"]
    assert stats["preemptions"] == len(boundaries) >= 1
    assert stats["resume_method"] == "completions" and stats["resumes"] == stats["preemptions"]
    assert workers[0]["stats"]["resume_method"] == "completions"
    with llama.client() as c:
        ref = c.chat.completions.create(model=llama.model, messages=messages(target), max_tokens=12, temperature=0.0)
    ref_text = ref.choices[0].message.content
    # llama.cpp's quantized kernels differ between a batched prefill (the resume reads prompt + partial in one
    # pass) and one-token decode steps, so a near-tie may go the other way after a resume: measured here with a
    # portable AVX2 build, "world!" uninterrupted against "world." resumed.  Text before the first resume is the
    # server's own greedy decode and must match; any difference may only start at or after a resume point.
    assert text[: boundaries[0]] == ref_text[: boundaries[0]]
    if text != ref_text:
        assert common_prefix(text, ref_text) >= boundaries[0], (text, ref_text, boundaries)


# ---- tools -------------------------------------------------------------------------------------------------------
def test_forced_tool_call_is_well_formed_and_runs_its_turn_unpreempted(llama, smollm2_dir, start_daemon):
    """A tool call cannot be continued by any text method: with a competitor waiting it is never preempted."""
    d = daemon(start_daemon, llama, smollm2_dir)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    prompt = messages("What is the weather in Paris?")
    with d.client() as c:
        competitor = c.submit(messages(COMPETITOR), max_tokens=30)
        r = c.chat(prompt, max_tokens=60, tools=[WEATHER], tool_choice=choice)
        other = result_of(list(c.events(competitor)))
    assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1
    call = r.tool_calls[0]
    assert call["id"] and call["type"] == "function" and call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert r.stats["quanta"] >= 2 and r.stats["preemptions"] == 0 and r.stats["resumes"] == 0
    assert other.stats["preemptions"] >= 1  # the competitor was switched out for it: preemption was on
    with llama.client() as c:  # the same call as an uninterrupted request straight to the server
        ref = c.chat.completions.create(model=llama.model, messages=prompt, max_tokens=60, temperature=0.0,
                                        tools=[WEATHER], tool_choice=choice)  # fmt: skip
    assert json.loads(ref.choices[0].message.tool_calls[0].function.arguments) == args


def test_streamed_tool_call_deltas_merge_once_per_name():
    """llama.cpp repeats the function name in every delta; OpenAI sends it once: both merge to one name."""
    from types import SimpleNamespace as NS

    from backends.continuation import PREFIX, TextContext

    def delta(name, args, id_="call_1"):
        return NS(index=0, id=id_, type="function", function=NS(name=name, arguments=args))

    for names in (["get_weather", "get_weather", "get_weather"], ["get_weather", None, None]):
        ctx = TextContext(1, {"tools": [WEATHER]})
        ctx.add_tool_deltas([delta(n, a) for n, a in zip(names, ['{"city"', ': "Paris', '"}'], strict=True)])
        assert ctx.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        assert not ctx.continuable_by(PREFIX)


# ---- JSON --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(FORMATS))
def test_json_is_enforced_and_not_preempted(llama, smollm2_dir, start_daemon, kind):
    """The grammar lives in the server's stream: the request runs its turn out (ps: not preemptible)."""
    d = daemon(start_daemon, llama, smollm2_dir)
    fmt = FORMATS[kind]
    with d.client() as c:
        competitor = c.submit(messages(COMPETITOR), max_tokens=30)
        it = c.chat(messages(JSON_PROMPT), stream=True, max_tokens=80, response_format=fmt)
        events = [next(it)]
        while sum(e.event == "token" for e in events) < 3:  # a quantum end has been handled by now
            events.append(next(it))
        rows = {r["pid"]: r for r in c.ps()["requests"]}
        events += list(it)
        result_of(list(c.events(competitor)))
    pid = events[-1].data["pid"]
    assert rows[pid]["state"] == "RUNNING" and rows[pid]["preemptible"] is False
    text, boundaries = check_stream(events)
    value = json.loads(text)
    assert isinstance(value, dict)
    if kind == "json_schema":
        jsonschema.validate(value, PERSON)
        assert "event=schema_form" in d.log()  # refused as json_schema, sent inline with json_object
    stats = events[-1].data["stats"]
    assert not boundaries and stats["preemptions"] == 0 and stats["quanta"] >= 2
    inline = {"type": "json_object", "schema": PERSON} if kind == "json_schema" else fmt
    with llama.client() as c:
        ref = c.chat.completions.create(model=llama.model, messages=messages(JSON_PROMPT), max_tokens=80,
                                        temperature=0.0, response_format=inline)  # fmt: skip
    assert text == ref.choices[0].message.content


def test_a_grammar_on_a_completions_resume_starts_a_second_json_value(llama, smollm2_dir):
    """Why JSON requests are not preemptible: ``/v1/completions`` takes a ``grammar``, but it
    constrains only the new tokens, from the start of a JSON value, not from the resume point."""
    from llama_cpp.llama_grammar import JSON_GBNF

    from backends.continuation import LocalTemplate

    chat = messages(JSON_PROMPT)
    prompt = LocalTemplate(str(smollm2_dir)).render(chat)
    with llama.client() as c:
        r = c.chat.completions.create(model=llama.model, messages=chat, max_tokens=80, temperature=0.0,
                                      response_format={"type": "json_object"})  # fmt: skip
        whole = r.choices[0].message.content
        part = whole[: whole.index('"') + 3]  # cut inside the first key
        rest = c.completions.create(model=llama.model, prompt=prompt + part, max_tokens=80, temperature=0.0,
                                    extra_body={"grammar": JSON_GBNF}).choices[0].text  # fmt: skip
    assert json.loads(whole) and rest.lstrip().startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(part + rest)


def test_json_requests_are_continuable_by_no_text_method():
    from backends.continuation import COMPLETIONS, PREFIX, TextContext

    for fmt in FORMATS.values():
        ctx = TextContext(1, {"response_format": fmt}, text='{"na')
        assert not ctx.continuable_by(PREFIX) and not ctx.continuable_by(COMPLETIONS)
    plain = TextContext(2, {"response_format": {"type": "text"}}, text="Hel")
    assert plain.continuable_by(PREFIX) and plain.continuable_by(COMPLETIONS)
    tools = TextContext(3, {"tools": [WEATHER]}, text="Let me")
    assert tools.continuable_by(PREFIX) and not tools.continuable_by(COMPLETIONS)


# ---- completions and logprobs ------------------------------------------------------------------------------------
STORY = "Once upon a time, in a small village by the sea,"


def _joined(entries: list) -> str:
    return "".join(e["token"] for e in entries)


def test_a_plain_completion_is_preempted_and_resumed_from_its_text(llama, smollm2_dir, start_daemon):
    """``prompt`` on an API worker: ``/v1/completions`` on the endpoint, resumed as prompt + the text so far."""
    d = daemon(start_daemon, llama, smollm2_dir)
    with d.client() as c:
        competitor = c.submit(messages(COMPETITOR), max_tokens=30)
        events = list(c.complete(STORY, stream=True, max_tokens=16))
        result_of(list(c.events(competitor)))
    text, boundaries = check_stream(events)
    stats = events[-1].data["stats"]
    assert stats["preemptions"] == len(boundaries) >= 1 and stats["resume_method"] == "completions"
    with llama.client() as c:
        ref = c.completions.create(model=llama.model, prompt=STORY, max_tokens=16, temperature=0.0).choices[0].text
    assert text[: boundaries[0]] == ref[: boundaries[0]]  # any difference starts at a resume (see above)
    assert common_prefix(text, ref) >= boundaries[0]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_logprobs_on_an_api_worker_are_the_endpoints_one_per_token(llama, smollm2_dir, start_daemon, kind):
    """Each token's entry as the endpoint streamed it: entries joined give the text, streamed and in ``done``."""
    d = daemon(start_daemon, llama, smollm2_dir)
    with d.client() as c:
        competitor = c.submit(messages(COMPETITOR), max_tokens=30)
        if kind == "chat":
            it = c.chat(messages("Say hello."), stream=True, max_tokens=12, logprobs=True, top_logprobs=2)
        else:
            it = c.complete(STORY, stream=True, max_tokens=12, logprobs=True, top_logprobs=2)
        events = list(it)
        result_of(list(c.events(competitor)))
    text, boundaries = check_stream(events)
    done = events[-1].data
    lps = done["logprobs"]
    streamed = [e for ev in events if ev.event == "token" for e in ev.data.get("logprobs", [])]
    assert boundaries and streamed == lps and len(lps) == done["usage"]["completion_tokens"]
    assert _joined(lps) == text
    for e in lps:
        assert e["logprob"] <= 0 and 1 <= len(e["top_logprobs"]) <= 2
        assert e["top_logprobs"][0]["logprob"] >= e["logprob"] - 1e-6  # greedy: the best one, or tied with it


def test_response_format_with_a_prompt_is_refused_by_api_workers(llama, smollm2_dir, start_daemon):
    from ipc.client import ClientError

    d = daemon(start_daemon, llama, smollm2_dir)
    with d.client() as c, pytest.raises(ClientError, match="response_format") as err:
        c.complete(STORY, max_tokens=4, response_format={"type": "json_object"})
    assert err.value.code == "unsupported_parameter"


def test_endpoint_logprobs_take_the_daemons_shape():
    from types import SimpleNamespace as NS

    from backends.api_logprobs import entries, request_fields

    assert request_fields("chat", {"logprobs": True, "top_logprobs": 3}) == {"logprobs": True, "top_logprobs": 3}
    assert request_fields("completions", {"logprobs": True}) == {"logprobs": 1}
    assert request_fields("chat", {}) == {}
    legacy = NS(logprobs=NS(tokens=[" a"], token_logprobs=[-0.5], top_logprobs=[{" b": -2.0, " a": -0.5}]))
    assert entries("completions", legacy, 1) == [
        {"token": " a", "logprob": -0.5, "bytes": [32, 97], "top_logprobs": [{"token": " a", "logprob": -0.5,
                                                                                "bytes": [32, 97]}]}]  # fmt: skip
    chat = NS(logprobs=NS(content=[NS(token="x", logprob=-0.1, bytes=[120], top_logprobs=[])]))
    assert entries("chat", chat, 2) == [{"token": "x", "logprob": -0.1, "bytes": [120], "top_logprobs": []}]
    assert entries("chat", NS(logprobs=None), 2) == []
