"""The API worker against a real OpenAI-compatible server (``transformers serve`` on SmolLM2).

Text-based context switching: preempted streams are closed and resumed from their text;
the agent sees one continuous stream.  Faults (a killed server, 500s, a server that never
answers) end in a retry or an error, never a hang.  Stubs stand in for the real server
only where it cannot misbehave on demand.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.harness.servers import HttpServer, free_port
from ipc.client import ClientError
from tests.conftest import REPO, messages

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Say hello.",
    "What is 2 plus 2?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain recursion in one sentence.",
    "What is the largest planet?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "What color is the sky?",
    "Name a fruit that is yellow.",
    "How many legs does a spider have?",
    "What is water made of?",
    "Translate 'thank you' into French.",
    "What is the opposite of hot?",
    "Describe a cat in five words.",
    "What do bees make?",
    "Name a famous painter.",
    "Why do leaves fall in autumn?",
]


class TransformersServe(HttpServer):
    """``transformers serve`` on a free loopback port, ready once it listens and lists its model."""

    def __init__(self, model_dir: Path, log_path: Path, timeout: float = 240.0):
        port = free_port()
        self.model_dir = model_dir
        cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu"]  # fmt: skip
        super().__init__("transformers serve", cmd, port, log_path, timeout)


@pytest.fixture(scope="session")
def server(smollm2_dir, tmp_path_factory) -> Iterator[TransformersServe]:
    s = TransformersServe(smollm2_dir, tmp_path_factory.mktemp("ts") / "serve.log")
    yield s
    s.stop()


def api_flags(url: str, *extra: str) -> tuple[str, ...]:
    return ("--backend", "openai", "--base-url", url, "--heartbeat-s", "0.5", *extra)


def reference(server: TransformersServe, prompts: list[str], max_tokens: int = MAX_TOKENS) -> list[str]:
    """Uninterrupted greedy outputs, straight from the server."""
    import openai

    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=120)
    out = []
    for p in prompts:
        r = client.chat.completions.create(model=server.model, messages=messages(p), max_tokens=max_tokens,
                                           temperature=0.0)  # fmt: skip
        out.append(r.choices[0].message.content or "")
    client.close()
    return out


def run_all(d, prompts: list[str], **params) -> list:
    """Submit all prompts at once from one agent; every request's events."""

    async def main():
        async with d.aclient(agent="api-test") as c:
            streams = await asyncio.gather(*(c.chat(messages(p), stream=True, **params) for p in prompts))
            return await asyncio.gather(*(collect(s) for s in streams))

    async def collect(stream):
        return [ev async for ev in stream]

    return asyncio.run(main())


def check_stream(events) -> tuple[str, list[int]]:
    """One continuous stream: the final text is the deltas joined; returns it and the resume points."""
    assert events[-1].event == "done", events[-1].data
    text, boundaries = "", []
    for ev in events:
        if ev.event == "token":
            text += ev.text
        elif ev.event == "preempted":
            boundaries.append(len(text))
    assert events[-1].data["text"] == text
    for b in boundaries:
        assert text.startswith(text[:b])
    return text, boundaries


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---- exactness ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens,preemptions", [(4, 1), (8, 3), (22, 10)])
def test_preempted_request_streams_one_continuous_text(server, smollm2_dir, start_daemon, max_tokens, preemptions):
    """With a long competitor always waiting and a 2-token quantum, the target yields every 2 tokens."""
    d = start_daemon(server.model, *api_flags(server.url, "--tokenizer", str(smollm2_dir), "--quantum-tokens", "2"))
    target = "Say hello."
    with d.client() as c:
        competitor = c.submit(messages("Tell me a long story about a dragon."), max_tokens=max_tokens + 40)
        cid = c.submit(messages(target), max_tokens=max_tokens)
        events = list(c.events(cid))
        list(c.events(competitor))
    text, boundaries = check_stream(events)
    done = events[-1].data
    assert done["stats"]["preemptions"] == preemptions == len(boundaries)
    assert done["stats"]["resumes"] == preemptions and done["stats"]["resume_method"] == "completions"
    assert done["stats"]["extra_prompt_tokens"] > 0
    assert done["usage"]["completion_tokens"] == max_tokens
    assert text == reference(server, [target], max_tokens)[0]


@pytest.mark.timeout(1500)  # ~2 minutes on an idle 2-core CPU; several times that when the CPU is shared
def test_greedy_text_matches_uninterrupted_runs(server, smollm2_dir, start_daemon):
    d = start_daemon(server.model, *api_flags(server.url, "--tokenizer", str(smollm2_dir), "--quantum-tokens", "6",
                                              "--slots", "2"))  # fmt: skip
    results = run_all(d, PROMPTS, max_tokens=MAX_TOKENS, temperature=0.0)
    refs = reference(server, PROMPTS)
    same, resumed = 0, 0
    diverged = []
    for prompt, events, ref in zip(PROMPTS, results, refs, strict=True):
        text, boundaries = check_stream(events)
        resumed += bool(boundaries)
        if text == ref:
            same += 1
        else:
            diverged.append((prompt, text, ref, boundaries))
    print(f"identical to the uninterrupted run: {same}/{len(PROMPTS)}; switched: {resumed}; diverged: {diverged}")
    assert resumed >= len(PROMPTS) // 2  # the comparison means something only if requests were switched
    assert same >= 0.95 * len(PROMPTS), diverged
    for prompt, text, ref, boundaries in diverged:
        assert_divergence_at_retokenization(smollm2_dir, prompt, text, ref, boundaries)


def assert_divergence_at_retokenization(model_dir: Path, prompt: str, text: str, ref: str, boundaries: list[int]):
    """The text diverged after a resume whose re-tokenized prompt differs from the tokens the uninterrupted run had."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rendered = tok.apply_chat_template(messages(prompt), add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
    ref_ids = out[0, len(prompt_ids) :].tolist()
    split = common_prefix(text, ref)
    assert split >= min(boundaries), "diverged before the first switch"
    for b in (b for b in boundaries if b <= split):
        k = next((k for k in range(len(ref_ids) + 1) if len(tok.decode(ref_ids[:k])) >= b), None)
        if tok(rendered + ref[:b], add_special_tokens=False)["input_ids"] != prompt_ids + ref_ids[:k]:
            return  # this resume re-read other tokens than the uninterrupted run had generated
    pytest.fail(f"{prompt!r}: diverged at char {split} with no re-tokenization difference at {boundaries}")


def test_endpoint_without_continuation_runs_requests_uninterruptible(server, start_daemon):
    """No --tokenizer and a server that refuses continue_final_message: requests run to the end."""
    d = start_daemon(server.model, *api_flags(server.url, "--quantum-tokens", "2"))
    prompts = ["Say hello.", "Name three colors."]
    with d.client() as c:
        ids = [c.submit(messages(p), max_tokens=16) for p in prompts]
        first = c.events(ids[0])
        head = [next(first), next(first)]
        assert [e.event for e in head] == ["accepted", "token"]
        rows = {r["state"]: r["preemptible"] for r in c.ps()["requests"]}
        assert rows == {"RUNNING": False, "READY": None}  # unknown until it runs
        table = subprocess.run([sys.executable, "-m", "scheduler", "ps", "--endpoint", d.endpoint],
                               capture_output=True, text=True, timeout=60, cwd=REPO).stdout  # fmt: skip
        assert "PREEMPT" in table.splitlines()[0] and " no " in table
        events = [[*head, *first], list(c.events(ids[1]))]
    for ev, ref in zip(events, reference(server, prompts, 16), strict=True):
        text, boundaries = check_stream(ev)
        assert text == ref and not boundaries
        stats = ev[-1].data["stats"]
        assert stats["preemptions"] == 0 and stats["quanta"] > 1 and stats["resumes"] == 0


# ---- faults ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokenizer", [True, False], ids=["resume-completions", "replay"])
def test_worker_killed_mid_request_restarts_from_daemon_record(server, smollm2_dir, start_daemon, tokenizer):
    """The daemon's record (text and token count) is enough: the new worker continues, or replays and skips."""
    flags = ["--tokenizer", str(smollm2_dir)] if tokenizer else []
    d = start_daemon(server.model, *api_flags(server.url, *flags))
    prompt = "Say hello."
    with d.client() as c:
        cid = c.submit(messages(prompt), max_tokens=MAX_TOKENS)
        it = c.events(cid)
        events = [next(it)]
        while sum(e.event == "token" for e in events) < 5:
            events.append(next(it))
        os.kill(d.worker_pids()[0], signal.SIGKILL)
        events += list(it)
    text, _ = check_stream(events)
    assert text == reference(server, [prompt])[0]
    stats = events[-1].data["stats"]
    assert stats["restarts"] == 1
    assert stats["resume_method"] == ("completions" if tokenizer else None)


def test_server_killed_mid_stream_ends_in_error_not_hang(smollm2_dir, tmp_path, start_daemon):
    doomed = TransformersServe(smollm2_dir, tmp_path / "doomed.log")
    try:
        d = start_daemon(doomed.model, *api_flags(doomed.url, "--tokenizer", str(smollm2_dir), "--api-retries", "2",
                                                  "--api-timeout-s", "5"))  # fmt: skip
        with d.client() as c:
            cid = c.submit(messages("Tell me a long story about a dragon."), max_tokens=400)
            it = c.events(cid)
            assert next(it).event == "accepted" and next(it).event == "token"
            os.kill(doomed.proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            events = list(it)
            assert time.monotonic() - t0 < 60
            assert events[-1].event == "error"
            assert "reach" in events[-1].data["message"] or "broke" in events[-1].data["message"]
            assert c.ps()["workers"][0]["alive"]
    finally:
        doomed.stop()


class Stub(http.server.ThreadingHTTPServer):
    """An OpenAI-shaped endpoint that fails on demand: ``fail`` 500s first, then a tiny stream."""

    daemon_threads = True

    def __init__(self, fail: int, deltas: tuple[str, ...] = ("Hi", " there")):
        self.fail, self.posts, self.deltas = fail, 0, deltas
        super().__init__(("127.0.0.1", 0), StubHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class StubHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.posts += 1
        if self.server.posts <= self.server.fail:
            self.send_response(500)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "stub failure", "type": "server_error"}}')
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        for delta, reason in (*(({"content": d}, None) for d in self.server.deltas), ({}, "stop")):
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "stub",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}  # fmt: skip
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("fail,ok", [(2, True), (100, False)])
def test_http_500_is_retried_then_reported(start_daemon, fail, ok):
    stub = Stub(fail)
    try:
        d = start_daemon("stub", *api_flags(stub.url, "--resume-method", "none", "--api-retries", "2"))
        with d.client() as c:
            if ok:
                r = c.chat(messages("hi"), max_tokens=8)
                assert r.text == "Hi there" and stub.posts == 3
            else:
                with pytest.raises(ClientError) as err:
                    c.chat(messages("hi"), max_tokens=8)
                assert "500" in err.value.message and stub.posts == 3
                assert err.value.code == "remote_error"
    finally:
        stub.shutdown()
        stub.server_close()


SCHEMA = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}  # fmt: skip


@pytest.mark.parametrize(
    "deltas,response_format,problem",
    [
        (("Hi", " there"), {"type": "json_object"}, "invalid JSON"),
        (('{"a":', ' "x"}'), SCHEMA, "does not match the schema"),
        (('{"a":', " 1}"), SCHEMA, None),
        (("Hi", " there"), None, None),
    ],
    ids=["not-json", "off-schema", "valid", "no-format"],
)
def test_json_from_an_endpoint_that_does_not_enforce_it_is_checked(start_daemon, deltas, response_format, problem):
    """Endpoints such as ``transformers serve`` accept response_format and ignore it: the worker checks."""
    stub = Stub(0, deltas)
    try:
        d = start_daemon("stub", *api_flags(stub.url, "--resume-method", "none"))
        with d.client() as c:
            kw = {"response_format": response_format} if response_format else {}
            if problem is None:
                assert c.chat(messages("hi"), max_tokens=8, **kw).text == "".join(deltas)
            else:
                with pytest.raises(ClientError) as err:
                    c.chat(messages("hi"), max_tokens=8, **kw)
                assert err.value.code == "invalid_output" and problem in err.value.message
    finally:
        stub.shutdown()
        stub.server_close()


def test_hanging_endpoint_times_out(start_daemon):
    """A server that accepts and never answers: the probe and the request time out, with retries."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
    try:
        d = start_daemon("silent", *api_flags(url, "--api-timeout-s", "1", "--api-retries", "1"))
        with d.client() as c:
            t0 = time.monotonic()
            with pytest.raises(ClientError) as err:
                c.chat(messages("hi"), max_tokens=8)
            assert "timed out" in err.value.message and time.monotonic() - t0 < 30
    finally:
        silent.close()


# ---- the text snapshot, without a server -------------------------------------------------------------------------
def test_stop_string_straddling_a_resume_point_is_caught():
    from backends.continuation import TextContext

    ctx = TextContext(1, {"max_tokens": 10, "stop": ["\n\n"]})
    ctx.add_text("Hello\n")
    assert ctx.release(["\n\n"]) == ("Hello", False)  # "\n" may start the stop string: held back
    ctx.add_text("\nWorld")  # the server, resumed after "Hello\n", saw only the second "\n"
    assert ctx.release(["\n\n"]) == ("", True) and ctx.text == "Hello"


def test_replay_skips_what_was_shown_and_refuses_other_text():
    from backends.continuation import ReplayDiverged, TextContext

    ctx = TextContext(1, {})
    ctx.text = ctx.replay = "Hello"
    ctx.released = 5
    assert ctx.add_text("Hel") == "" and ctx.add_text("lo there") == " there" and ctx.text == "Hello there"
    other = TextContext(2, {})
    other.text = other.replay = "Hello"
    with pytest.raises(ReplayDiverged):
        other.add_text("Help")


def test_resume_requests_lower_max_tokens(smollm2_dir):
    from backends.continuation import COMPLETIONS, PREFIX, LocalTemplate, TextContext, request_for

    chat = {"messages": messages("Hi"), "max_tokens": 24, "temperature": 0.0, "top_p": 1.0, "seed": 7, "stop": []}
    ctx = TextContext(1, chat, text="Hello there", generated=2)
    kind, kw = request_for(ctx, "m", PREFIX, None)
    assert kind == "chat" and kw["max_tokens"] == 22 and kw["messages"][-1] == {"role": "assistant",
                                                                                  "content": "Hello there"}  # fmt: skip
    assert kw["extra_body"] == {"continue_final_message": True, "add_generation_prompt": False}
    template = LocalTemplate(str(smollm2_dir))
    kind, kw = request_for(ctx, "m", COMPLETIONS, template)
    assert kind == "completions" and kw["prompt"].endswith("<|im_start|>assistant\nHello there")
    tools = {"tools": [{"type": "function", "function": {"name": "f"}}]}
    assert ctx.continuable_by(COMPLETIONS) and not TextContext(2, chat | tools).continuable_by(COMPLETIONS)
