"""The OpenAI-compatible HTTP front and the Prometheus metrics, against a real daemon, with the official client.

One daemon serves the whole module (one slot, a 2-token quantum, so requests share the slot and
preempt each other): every HTTP request must be a syscall like any other.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jsonschema
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from ipc import protocol as P
from ipc.client import Client, ClientError
from scheduler.launch import http_options
from tests.conftest import REPO, DaemonProc, messages
from tests.test_structured import SCHEMA, WEATHER

TOKEN = "s3cret-token"
DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def front(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    (tmp / "token").write_text(TOKEN + "\n")
    d = DaemonProc(tiny_model_dir, tmp, "--slots", "1", "--quantum-tokens", "2", "--http", "127.0.0.1:0",
                   "--http-token-file", str(tmp / "token"), "--metrics-port", "0", "--heartbeat-s", "0.2",
                   "--objective-nice", "interactive=-10", "--objective-nice", "batch=10")  # fmt: skip
    with d.client(timeout=30) as c:
        d.urls = c.stats()["endpoints"]
    d.model_id = tiny_model_dir.name
    yield d
    d.stop()


def api(d: DaemonProc, key: str = TOKEN) -> OpenAI:
    return OpenAI(base_url=d.urls["http"] + "/v1", api_key=key, max_retries=0, timeout=DEADLINE_S)


def raw(d: DaemonProc, path: str, body: bytes | None = None, token: str | None = TOKEN, method: str | None = None):
    """(status, headers, parsed JSON body) of one plain HTTP request."""
    req = urllib.request.Request(d.urls["http"] + path, data=body, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=DEADLINE_S) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def quantad(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "console", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=dict(os.environ, **(env or {})))  # fmt: skip


def rows_of(c: Client, agent: str) -> list[dict]:
    return [r for r in c.ps()["requests"] if r["agent"] == agent]


def wait_for_row(d: DaemonProc, agent: str) -> dict:
    end = time.monotonic() + DEADLINE_S
    with d.client(timeout=30) as c:
        while time.monotonic() < end:
            rows = rows_of(c, agent)
            if rows:
                return rows[0]
            time.sleep(0.01)  # polling ps with a deadline (and under the per-connection rate)
    raise AssertionError(f"no request of agent {agent!r} in ps")


def test_health_models_and_bearer_token(front):
    status, _, body = raw(front, "/health", token=None)  # probes need no token
    assert status == 200 and body["status"] == "ok" and body["workers"] == {"configured": 1, "up": 1}
    models = api(front).models.list()
    assert [m.id for m in models.data] == [front.model_id] and models.data[0].owned_by == "quantad"
    assert api(front).models.retrieve(front.model_id).id == front.model_id
    with pytest.raises(openai.AuthenticationError) as bad:
        api(front, key="wrong").models.list()
    assert bad.value.status_code == 401 and bad.value.body["code"] == "invalid_api_key"
    status, headers, body = raw(front, "/v1/chat/completions", b"{}", token=None)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and body["error"]["type"]
    with pytest.raises(openai.AuthenticationError):
        api(front, key="wrong").chat.completions.create(model=front.model_id, messages=messages("hi"))
    with front.client(timeout=30) as c:
        assert c.stats()["accepted"] == 0  # refused before it became a request


def test_tokenize_and_detokenize_count_as_the_model_does(front):
    limit = api(front).models.retrieve(front.model_id).model_extra["max_model_len"]
    assert limit == 2048  # the tiny model's positions, as its worker reported them
    chat = messages("How many tokens is this?")
    status, _, body = raw(front, "/tokenize", json.dumps({"model": front.model_id, "messages": chat}).encode())
    assert status == 200 and body["max_model_len"] == limit and body["count"] == len(body["tokens"]) > 5
    with front.client(timeout=60) as c:
        done = c.chat(chat, max_tokens=1)
        assert done.usage["prompt_tokens"] == body["count"]  # what the worker computed for the same chat
        assert c.tokenize(messages=chat)["tokens"] == body["tokens"]
        ids = c.tokenize("Hello there")["tokens"]
        assert c.detokenize(ids) == "Hello there"
        with pytest.raises(ClientError) as bad:
            c.detokenize([10**9])
        assert bad.value.code == "bad_field"
    status, _, body = raw(front, "/detokenize", json.dumps({"tokens": ids}).encode())
    assert status == 200 and body == {"prompt": "Hello there"}
    assert raw(front, "/tokenize", json.dumps({"prompt": "x"}).encode(), token=None)[0] == 401
    status, _, body = raw(front, "/tokenize", json.dumps({"prompt": "x", "messages": chat}).encode())
    assert status == 400 and body["error"]["code"] == "bad_field"


def test_chat_streaming_and_not_matches_the_zmq_client(front):
    with front.client(timeout=DEADLINE_S) as c:
        ref = c.chat(messages("Name a colour."), max_tokens=12)
        sampled = c.chat(messages("Name a colour."), max_tokens=12, temperature=0.8, top_p=0.9, seed=5)
    client = api(front)
    r = client.chat.completions.create(model=front.model_id, messages=messages("Name a colour."), max_tokens=12,
                                       temperature=0, user="tester")  # fmt: skip
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == ref.usage["completion_tokens"] and r.model == front.model_id
    assert r.model_extra["quantad"]["pid"] > ref.pid and r.model_extra["quantad"]["stats"]["quanta"] >= 1

    stream = client.chat.completions.create(model=front.model_id, messages=messages("Name a colour."),
                                            max_completion_tokens=12, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == ref.usage["total_tokens"]

    # sampling parameters and stop strings reach the worker as given
    same = client.chat.completions.create(model=front.model_id, messages=messages("Name a colour."), max_tokens=12,
                                          temperature=0.8, top_p=0.9, seed=5)  # fmt: skip
    assert same.choices[0].message.content == sampled.text
    words = [w for w in ref.text.split(" ") if w]
    stop = " " + words[len(words) // 2]
    assert stop in ref.text, (ref.text, stop)
    cut = client.chat.completions.create(model=front.model_id, messages=messages("Name a colour."), max_tokens=12,
                                         stop=[stop])  # fmt: skip
    assert cut.choices[0].message.content == ref.text[: ref.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_tools_and_response_format_pass_through(front):
    client = api(front)
    for stream in (False, True):
        kw = dict(model=front.model_id, messages=messages("Weather in Paris?"), tools=[WEATHER],
                  tool_choice="required", max_tokens=60)  # fmt: skip
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            deltas = [c for ch in chunks for c in (ch.choices[0].delta.tool_calls or [])]
            assert {d.index for d in deltas} == {0} and len(deltas) > 1  # the call streams in pieces
            calls = [deltas[0].model_copy(deep=True)]
            calls[0].function.arguments = "".join(d.function.arguments or "" for d in deltas)
            finish = chunks[-1].choices[0].finish_reason
            assert not any(ch.choices[0].delta.content for ch in chunks)  # markup is not streamed as text
        else:
            r = client.chat.completions.create(**kw)
            calls, finish = r.choices[0].message.tool_calls, r.choices[0].finish_reason
            assert r.choices[0].message.content is None
        assert finish == "tool_calls" and len(calls) == 1
        assert calls[0].function.name == "get_weather" and calls[0].id and calls[0].type == "function"
        assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "Rome", "Oslo")
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}
    r = client.chat.completions.create(model=front.model_id, messages=messages("Answer in JSON."), max_tokens=80,
                                       response_format=fmt)  # fmt: skip
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_http_requests_share_the_slot_show_in_ps_and_are_killed(front):
    """A ZeroMQ agent and HTTP clients at once: one slot, so they preempt each other; `quantad kill` ends them."""
    ep = ["--endpoint", front.endpoint]
    with front.client(timeout=DEADLINE_S) as c:
        cid = c.submit(messages("a long story"), max_tokens=200, min_tokens=200)
        zmq_events = c.events(cid)
        seen = [next(zmq_events), next(zmq_events)]  # accepted, then its first token: it holds the slot
        assert seen[1].event == P.EV_TOKEN

        stream = api(front).chat.completions.create(model=front.model_id, messages=messages("go on"), stream=True,
                                                    max_tokens=2000, user="http-agent",
                                                    extra_body={"min_tokens": 2000})  # fmt: skip
        it = iter(stream)
        assert next(it).choices[0].delta.role == "assistant"
        first = next(it)  # a token: the ZeroMQ request was preempted to make room
        assert first.choices[0].delta.content is not None
        table = json.loads(quantad("ps", "--json", *ep).stdout)
        (row,) = [r for r in table["requests"] if r["agent"] == "http-agent"]
        assert row["state"] in ("RUNNING", "READY") and row["tokens"] >= 1
        killed = quantad("kill", str(row["pid"]), *ep)
        assert killed.returncode == 0, killed.stderr
        with pytest.raises(openai.APIError) as cut:
            for _ in it:
                pass
        assert cut.value.body["code"] == "cancelled" and "killed" in cut.value.message

        rest = seen + list(zmq_events)  # the ZeroMQ agent is unaffected
        assert rest[-1].event == P.EV_DONE and rest[-1].data["usage"]["completion_tokens"] == 200
        assert any(e.event == P.EV_PREEMPTED for e in rest)

    # non-streaming: the kill answers 409, marked not to be retried
    got: dict = {}

    def ask() -> None:
        try:
            api(front).chat.completions.create(model=front.model_id, messages=messages("x"), max_tokens=2000,
                                               user="http-blocking", extra_body={"min_tokens": 2000})  # fmt: skip
        except openai.APIStatusError as exc:
            got["error"] = exc

    t = threading.Thread(target=ask)
    t.start()
    pid = wait_for_row(front, "http-blocking")["pid"]
    with front.client(timeout=30) as c:
        c.kill(pid)
    t.join(DEADLINE_S)
    exc = got["error"]
    assert exc.status_code == 409 and exc.body["code"] == "cancelled"
    assert exc.response.headers["x-should-retry"] == "false"


def test_a_client_that_hangs_up_cancels_its_request(front):
    stream = api(front).chat.completions.create(model=front.model_id, messages=messages("x"), stream=True,
                                                max_tokens=2000, user="hangs-up",
                                                extra_body={"min_tokens": 2000})  # fmt: skip
    it = iter(stream)
    next(it), next(it)
    pid = int(stream.response.headers["x-quantad-pid"])
    assert wait_for_row(front, "hangs-up")["pid"] == pid
    stream.close()
    end = time.monotonic() + DEADLINE_S
    line = f'event=cancelled pid={pid} why="cancelled by agent"'
    while line not in front.log():
        assert time.monotonic() < end, "the request outlived its HTTP client"
    with front.client(timeout=30) as c:
        assert not rows_of(c, "hangs-up")


def test_errors_are_openai_shaped(front):
    client = api(front)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=front.model_id, messages=messages("x"), temperature=-1)
    assert bad.value.body["code"] == "bad_field" and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=front.model_id, messages=messages("x"), user="u" * 200)
    assert bad.value.body["param"] == "user"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=messages("x"))
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=front.model_id, messages=messages("x"), n=9)  # 1..8
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=front.model_id, messages=image)
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]  # fmt: skip
    assert client.chat.completions.create(model=front.model_id, messages=parts, max_tokens=3).choices

    for body, status in ((b"{not json", 400), (b"[1, 2]", 400), (json.dumps({"model": front.model_id}).encode(), 400),
                         (b'{"model": "m", "messages": [' + b"[" * 100_000 + b"]", 400)):  # fmt: skip
        got, headers, err = raw(front, "/v1/chat/completions", body)
        assert got == status and set(err["error"]) >= {"message", "type", "param", "code"}, (body[:40], err)
        assert headers["x-should-retry"] == "false"
    huge = json.dumps({"model": front.model_id, "messages": messages("x" * (5 << 20))}).encode()
    assert raw(front, "/v1/chat/completions", huge)[0] == 413
    assert raw(front, "/v1/nothing")[0] == 404
    assert raw(front, "/v1/chat/completions", method="GET")[0] == 405
    status, _, body = raw(front, "/health", token=None)
    assert status == 200  # and the daemon serves on


def families(d: DaemonProc, url: str | None = None) -> dict:
    with urllib.request.urlopen(url or d.urls["metrics"], timeout=DEADLINE_S) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str, sample: str | None = None, **labels: str) -> float:
    fam = fams[name]
    want = sample or (name + "_total" if fam.type == "counter" else name)
    return sum(s.value for s in fam.samples if s.name == want and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_are_scraped_and_move(front):
    before = families(front)
    for name in ("quantad_requests", "quantad_queue_length", "quantad_preemptions", "quantad_context_bytes",
                 "quantad_time_to_first_token_seconds", "quantad_time_per_output_token_seconds",
                 "quantad_job_completion_seconds", "quantad_generated_tokens", "quantad_worker_up",
                 "quantad_requests_finished", "quantad_worker_restarts"):  # fmt: skip
        assert name in before, name
    assert value(before, "quantad_worker_up", worker="w0") == 1.0
    on_front = families(front, front.urls["http"] + "/metrics")  # the same page on the HTTP port, no token
    assert set(on_front) == set(before) and "vllm:num_requests_waiting" in on_front
    assert {s.labels["tier"] for s in before["quantad_context_bytes"].samples} == set(P.TIERS)
    assert {s.labels["state"] for s in before["quantad_requests"].samples} >= {"READY", "RUNNING"}

    with front.client(timeout=DEADLINE_S) as c:
        ids = [c.submit(messages(f"story {i}"), max_tokens=200, min_tokens=200) for i in range(2)]
        streams = [c.events(cid) for cid in ids]
        evs = [[next(s)] for s in streams]
        while not any(e.event == P.EV_PREEMPTED for e in evs[0]):  # one slot: they take turns
            evs[0].append(next(streams[0]))
        saved = None
        end = time.monotonic() + DEADLINE_S
        while saved is None and time.monotonic() < end:  # a preempted context, as the next heartbeat reports it
            during = families(front)
            if value(during, "quantad_context_bytes", tier="device") > 0:
                saved = during
        assert saved is not None, "no context bytes reported while a request was preempted"
        assert value(saved, "quantad_requests", state="RUNNING") + value(saved, "quantad_requests", state="READY") >= 1
        # the inference pool's gauges (vLLM's names), from the same scrape; both requests live, as ps shows
        waiting, running = value(saved, "vllm:num_requests_waiting"), value(saved, "vllm:num_requests_running")
        assert waiting == value(saved, "quantad_queue_length") and running == value(saved, "quantad_requests",
                                                                                   state="RUNNING")  # fmt: skip
        assert running + waiting == len(c.ps()["requests"]) == 2 and running <= 1
        kv = value(saved, "quantad_context_bytes", tier="device") / (512 << 20)  # the default --device-budget
        assert value(saved, "vllm:kv_cache_usage_perc") == pytest.approx(min(1.0, kv)) and 0 < kv
        for s, e in zip(streams, evs, strict=True):
            e += list(s)
    after = families(front)
    assert value(after, "quantad_generated_tokens") - value(before, "quantad_generated_tokens") == 400
    assert value(after, "quantad_preemptions") > value(before, "quantad_preemptions")
    for hist in ("quantad_time_to_first_token_seconds", "quantad_time_per_output_token_seconds",
                 "quantad_job_completion_seconds"):  # fmt: skip
        assert value(after, hist, hist + "_count") - value(before, hist, hist + "_count") == 2
        assert value(after, hist, hist + "_sum") > value(before, hist, hist + "_sum")
    done = value(after, "quantad_requests_finished", state="DONE") - value(before, "quantad_requests_finished",
                                                                           state="DONE")  # fmt: skip
    assert done == 2 and value(after, "quantad_queue_length") == 0


def test_an_inference_objective_runs_at_its_nice(front):
    """A pool's gateway forwards the request's x-gateway-inference-objective header: ``--objective-nice``
    maps it onto the nice quantad schedules by; a body's own ``nice`` wins, an unknown objective is 0."""
    cases = [("batch", None, 10), ("interactive", None, -10), ("interactive", 3, 3), ("unknown", None, 0)]
    for objective, body_nice, want in cases:
        agent = f"objective-{objective}-{body_nice}"
        extra = {"min_tokens": 2000} | ({} if body_nice is None else {"nice": body_nice})
        header = {"x-gateway-inference-objective": objective}
        held = api(front).chat.completions.create(model=front.model_id, messages=messages("a long one"), stream=True,
                                                  max_tokens=2000, user=agent, extra_body=extra,
                                                  extra_headers=header)  # fmt: skip
        next(iter(held))  # running now, and until the stream is closed
        with front.client(timeout=30) as c:
            rows = rows_of(c, agent)
        held.close()
        assert [r["nice"] for r in rows] == [want], objective


def test_each_token_entry_is_an_identity_with_its_own_quota(tiny_model_dir, tmp_path):
    (tmp_path / "tokens").write_text("# name token\nalice tok-a\nbob tok-b\n")
    d = DaemonProc(tiny_model_dir, tmp_path, "--slots", "1", "--http", "127.0.0.1:0", "--http-token-file",
                   str(tmp_path / "tokens"), "--requests-per-identity", "1")  # fmt: skip
    try:
        with d.client(timeout=30) as c:
            d.urls = c.stats()["endpoints"]
        model = tiny_model_dir.name
        held = api(d, "tok-a").chat.completions.create(model=model, messages=messages("a long one"), stream=True,
                                                       max_tokens=2000, extra_body={"min_tokens": 2000})  # fmt: skip
        it = iter(held)
        next(it)  # alice's one live request
        with pytest.raises(openai.RateLimitError) as over:
            api(d, "tok-a").chat.completions.create(model=model, messages=messages("and another"), max_tokens=2)
        assert over.value.body["code"] == "quota_exceeded"
        bob = api(d, "tok-b").chat.completions.create(model=model, messages=messages("bob's"), max_tokens=2)
        assert bob.choices[0].message.content is not None  # another token: another identity
        with pytest.raises(openai.AuthenticationError):
            api(d, "tok-c").models.list()
        with d.client(timeout=30) as c:
            owners = {r["owner"] for r in c.ps()["requests"]}
        assert owners == {"http:alice"}
        held.close()
    finally:
        d.stop()


def test_http_must_be_loopback_unless_allowed(tmp_path):
    ep = ["--endpoint", f"ipc://{tmp_path}/a.sock"]
    out = quantad("serve", "--http", "0.0.0.0:8000", *ep)
    assert out.returncode == 2 and "not a loopback address" in out.stderr and "--http-allow-remote" in out.stderr
    out = quantad("serve", "--http", "8000", *ep)
    assert out.returncode == 2 and "HOST:PORT" in out.stderr
    (tmp_path / "empty").write_text("\n")
    out = quantad("serve", "--http", "127.0.0.1:0", "--http-token-file", str(tmp_path / "empty"), *ep)
    assert out.returncode == 2 and "token is empty" in out.stderr
    conf = tmp_path / "q.toml"
    conf.write_text('http = "localhost"\nmetrics_port = 99999\n')
    out = quantad("config", "check", "--config", str(conf))
    assert out.returncode == 1 and f"{conf}:1: http: expected HOST:PORT" in out.stderr
    assert f"{conf}:2: metrics_port: not a port number" in out.stderr
    out = quantad("config", "show", "--json", env={"QUANTAD_HTTP": "[::1]:8000", "QUANTAD_METRICS_PORT": "9464"})
    shown = json.loads(out.stdout)["options"]
    assert shown["http"] == {"value": "[::1]:8000", "source": "env:QUANTAD_HTTP"}
    assert shown["metrics_port"] == {"value": 9464, "source": "env:QUANTAD_METRICS_PORT"}
    assert shown["http_allow_remote"] == {"value": False, "source": "default"}

    def opts(**kw) -> argparse.Namespace:
        base = dict(http=None, http_allow_remote=False, http_token_file=None, http_token_env=None)
        return argparse.Namespace(**(base | kw))

    assert http_options(opts(http="[::1]:8080")) == (("::1", 8080), None)
    assert http_options(opts(http="localhost:0")) == (("localhost", 0), None)
    assert http_options(opts(http="0.0.0.0:80", http_allow_remote=True)) == (("0.0.0.0", 80), None)
    with pytest.raises(ValueError):
        http_options(opts(http="10.1.2.3:80"))


def test_drain_answers_http_requests_and_health_says_draining(tiny_model_dir, start_daemon):
    """SIGTERM: queued HTTP requests get `shutting_down` at once (503, or an error chunk), /health turns 503."""
    d = start_daemon(tiny_model_dir, "--policy", "fifo", "--http", "127.0.0.1:0", "--grace-s", "120")
    with d.client(timeout=DEADLINE_S) as c:
        d.urls = c.stats()["endpoints"]
        cid = c.submit(messages("a long story"), max_tokens=2000, min_tokens=2000)  # holds the only slot
        it = c.events(cid)
        next(it), next(it)
        stream = api(d, key="any").chat.completions.create(model=tiny_model_dir.name, messages=messages("x"),
                                                           stream=True, user="queued-stream")  # fmt: skip
        chunks = iter(stream)
        next(chunks)  # the role chunk: accepted, and queued behind the running request
        got: dict = {}

        def ask() -> None:
            try:
                api(d, key="any").chat.completions.create(model=tiny_model_dir.name, messages=messages("y"),
                                                          user="queued-plain")  # fmt: skip
            except openai.APIStatusError as exc:
                got["error"] = exc

        t = threading.Thread(target=ask)
        t.start()
        assert wait_for_row(d, "queued-plain")["state"] == "READY"
        d.proc.send_signal(signal.SIGTERM)
        t.join(DEADLINE_S)
        exc = got["error"]
        assert exc.status_code == 503 and exc.body["code"] == P.E_SHUTTING_DOWN
        assert exc.response.headers["x-should-retry"] == "true"
        with pytest.raises(openai.APIError) as cut:
            list(chunks)
        assert cut.value.body["code"] == P.E_SHUTTING_DOWN
        status, _, body = raw(d, "/health", token=None)
        assert status == 503 and body["status"] == "draining"
        d.proc.send_signal(signal.SIGTERM)  # a second signal cuts the drain
        assert list(it)[-1].data["code"] == P.E_SHUTTING_DOWN
    assert d.proc.wait(DEADLINE_S) == 0


def test_a_taken_port_fails_the_start(tiny_model_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = quantad("serve", "--model", str(tiny_model_dir), "--endpoint", f"ipc://{tmp_path}/a.sock",
                      "--metrics-port", str(port))  # fmt: skip
    assert out.returncode == 1 and "event=fatal" in out.stderr and "cannot listen" in out.stderr
