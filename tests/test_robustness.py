"""Invariants 3 and 4: bad input, kill, disconnects and dead workers never stop the daemon."""

import os
import signal

import msgpack
import pytest
import zmq

from ipc import protocol as P
from tests.conftest import messages


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory):
    from tests.conftest import DaemonProc

    d = DaemonProc(tiny_model_dir, tmp_path_factory.mktemp("robust"), "--quantum-tokens", "2")
    yield d
    assert d.stop() == 0


def raw_socket(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 10_000)
    s.connect(endpoint)
    return s


BAD_INPUT = [
    ([b"\xc1"], P.E_BAD_FRAME),
    ([b"not msgpack at all"], P.E_BAD_FRAME),
    ([msgpack.packb([1, 2])], P.E_BAD_FRAME),
    ([msgpack.packb({"v": 2, "op": "ping", "id": 1})], P.E_BAD_VERSION),
    ([msgpack.packb({"v": 1, "op": "fork", "id": 1})], P.E_UNKNOWN_OP),
    ([msgpack.packb({"v": 1, "id": 1})], P.E_BAD_FIELD),
    ([msgpack.packb({"v": 1, "op": "chat", "id": 1})], P.E_BAD_FIELD),
    ([msgpack.packb({"v": 1, "op": "chat", "id": 2, "messages": [{"role": "user", "content": "x"}], "max_tokens": -5})],
     P.E_BAD_FIELD),
    ([msgpack.packb({"v": 1, "op": "chat", "id": 3, "messages": [{"role": "user", "content": "x"}], "top_p": "a"})],
     P.E_BAD_FIELD),
    ([msgpack.packb({"v": 1, "op": "chat", "id": [1], "messages": []})], P.E_BAD_FIELD),
    ([msgpack.packb({"v": 1, "op": "kill", "id": 4, "pid": "one"})], P.E_BAD_FIELD),
    ([msgpack.packb({"v": 1, "op": "kill", "id": 5, "pid": 99999})], P.E_NOT_FOUND),
    ([msgpack.packb({"v": 1, "op": "ping", "id": 6}), b"extra frame"], P.E_BAD_FRAME),
    ([msgpack.packb({"v": 1, "op": "cancel"})], P.E_BAD_FIELD),
    ([msgpack.packb({"v": 1, "op": "cancel", "id": 7})], P.E_NOT_FOUND),
    ([msgpack.packb({"v": 1, "op": "tokenize", "id": 8})], P.E_BAD_FIELD),
    ([msgpack.packb({"v": 1, "op": "detokenize", "id": 9, "tokens": ["a"]})], P.E_BAD_FIELD),
    ([msgpack.packb({"v": 1, "op": "chat", "id": 10, "messages": [{"role": "user", "content": "x"}], "n": 2})],
     P.E_UNSUPPORTED),
]  # fmt: skip


@pytest.mark.parametrize("frames,code", BAD_INPUT)
def test_bad_input_gets_error_reply_and_daemon_keeps_serving(daemon, frames, code):
    s = raw_socket(daemon.endpoint)
    try:
        s.send_multipart(frames)
        reply = msgpack.unpackb(s.recv(), raw=False)
        assert reply["event"] == "error" and reply["code"] == code and reply["message"]
    finally:
        s.close()
    with daemon.client() as c:
        assert c.chat("still there?", max_tokens=3).finish_reason in ("length", "stop")


def test_oversized_message_is_dropped_and_daemon_keeps_serving(daemon):
    s = raw_socket(daemon.endpoint)
    s.setsockopt(zmq.RCVTIMEO, 500)
    try:
        s.send(b"\x00" * (P.MAX_FRAME + 10))  # ZMQ MAXMSGSIZE drops the connection, not the daemon
    finally:
        s.close()
    with daemon.client() as c:
        assert c.chat("hello", max_tokens=3).usage["completion_tokens"] >= 1


def test_duplicate_id_is_refused(daemon):
    with daemon.client() as c:
        c.send({"op": "chat", "id": "same", "messages": messages("a"), "max_tokens": 20})
        c.send({"op": "chat", "id": "same", "messages": messages("b"), "max_tokens": 20})
        events = list(c.events("same"))
        codes = [e.data.get("code") for e in events if e.event == "error"]
        assert P.E_DUPLICATE_ID in codes
        # The first request still gets its one terminal reply.
        while not events or events[-1].event != "done":
            events = list(c.events("same"))
        assert events[-1].event == "done"


def test_kill_gives_cancelled_terminal_reply(daemon):
    with daemon.client() as victim, daemon.client() as admin:
        cid = victim.submit(messages("a long story"), max_tokens=500)
        it = victim.events(cid)
        accepted = next(it)
        pid = accepted.data["pid"]
        assert next(it).event == "token"
        assert admin.kill(pid) == {"killed": pid}
        rest = list(it)
        assert rest[-1].event == "cancelled" and sum(e.terminal for e in rest) == 1
        assert all(r["pid"] != pid for r in admin.ps()["requests"])
        assert admin.chat("after kill", max_tokens=3).finish_reason in ("length", "stop")


def test_client_disconnect_mid_stream_cancels_and_daemon_serves(daemon):
    c = daemon.client()
    cid = c.submit(messages("tell me everything"), max_tokens=800)
    it = c.events(cid)
    pid = next(it).data["pid"]
    assert next(it).event == "token"
    c.close()  # gone without a word
    with daemon.client() as other:
        r = other.chat("are you alive?", max_tokens=20)
        assert r.usage["completion_tokens"] >= 1
        # The orphan was cancelled when the daemon could not deliver to its agent.
        assert all(row["pid"] != pid for row in other.ps()["requests"])


def test_worker_killed_mid_request_loses_and_repeats_nothing(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--quantum-tokens", "4", "--heartbeat-s", "0.2")
    with d.client() as c:
        reference = c.chat(messages("recover me"), max_tokens=40)
        cid = c.submit(messages("recover me"), max_tokens=40)
        events, killed = [], False
        for ev in c.events(cid):
            events.append(ev)
            if not killed and sum(e.event == "token" for e in events) == 10:
                os.kill(d.worker_pids()[0], signal.SIGKILL)
                killed = True
        assert events[-1].event == "done"
        streamed = [t for e in events if e.event == "token" for t in e.data["token_ids"]]
        assert streamed == reference.token_ids
        assert "".join(e.text for e in events if e.event == "token") == reference.text == events[-1].data["text"]
        assert events[-1].data["stats"]["restarts"] == 1
        # The restarted worker serves new requests.
        assert c.chat("again", max_tokens=5).usage["completion_tokens"] >= 1
