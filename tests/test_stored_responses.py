"""Stored and background responses (the Responses API's ``store``, ``previous_response_id``, ``background``),
driven by the official ``openai`` SDK against real daemons on the tiny model.

Two bearer tokens are two identities: one's stored responses are as absent to the other as an
unknown id.  A background stream cut by a daemon SIGKILL is read again after a restart from the
last sequence number the client had: the events joined equal an uncrashed run's, none repeated
or missing.
"""

from __future__ import annotations

import os
import signal
import socket

import openai
import psutil
import pytest

from ipc import protocol as P
from ipc.client import ClientError
from tests.conftest import DaemonProc, messages

FLAGS = ("--slots", "1", "--quantum-tokens", "2")


def _api(d: DaemonProc, token: str) -> openai.OpenAI:
    return d.openai(api_key=token)


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stored")
    (tmp / "tokens").write_text("alice tok-a\nbob tok-b\ncarol tok-c\n")
    d = DaemonProc(tiny_model_dir, tmp, *FLAGS, "--http", "127.0.0.1:0", "--http-token-file", str(tmp / "tokens"),
                   "--max-stored-responses", "3")  # fmt: skip
    d.model_id = tiny_model_dir.name
    yield d
    d.stop()


def _text(events) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def _shape(events) -> list[tuple[str, str | None]]:
    """Events as a client reads them, without the ids that differ between two responses."""
    return [(e.type, getattr(e, "delta", None)) for e in events]


def test_previous_response_id_continues_a_conversation_over_three_turns(daemon):
    alice, bob = _api(daemon, "tok-a"), _api(daemon, "tok-b")
    ask = {"model": daemon.model_id, "max_output_tokens": 6}
    r1 = alice.responses.create(input="My name is Ann.", **ask)
    r2 = alice.responses.create(input="What is my name?", previous_response_id=r1.id, **ask)
    r3 = alice.responses.create(input="Say it again.", previous_response_id=r2.id, **ask)
    assert r3.previous_response_id == r2.id and r3.store is True
    conversation = [*messages("My name is Ann."), {"role": "assistant", "content": r1.output_text},
                    *messages("What is my name?"), {"role": "assistant", "content": r2.output_text},
                    *messages("Say it again.")]  # fmt: skip
    with daemon.client(timeout=60) as c:
        chat = c.chat(conversation, max_tokens=6)
    assert r3.output_text == chat.text and r3.usage.input_tokens == chat.usage["prompt_tokens"]
    items = alice.responses.input_items.list(r3.id, order="asc").data
    assert [(i.type, i.role) for i in items] == [("message", r) for r in ("user", "assistant") * 2 + ("user",)]
    assert [i.id for i in alice.responses.input_items.list(r3.id).data] == [i.id for i in items][::-1]  # desc
    again = alice.responses.retrieve(r3.id)
    assert (again.id, again.output_text, again.status, again.output[0].id) == (r3.id, r3.output_text, r3.status,
                                                                               r3.output[0].id)  # fmt: skip
    with pytest.raises(openai.NotFoundError):  # another identity's response is not there for it
        bob.responses.retrieve(r3.id)
    with pytest.raises(openai.NotFoundError) as err:
        bob.responses.create(input="Go on.", previous_response_id=r3.id, **ask)
    assert err.value.body["param"] == "previous_response_id"


def test_a_background_response_runs_for_nobody_and_is_read_back(daemon):
    alice = _api(daemon, "tok-a")
    ask = {"model": daemon.model_id, "input": "Tell a story.", "max_output_tokens": 24}
    plain = alice.responses.create(**ask)
    bg = alice.responses.create(background=True, **ask)
    assert bg.status == "queued" and bg.background is True and bg.output == []
    events = list(alice.responses.retrieve(bg.id, stream=True))  # waits on its events, not on a timer
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type in ("response.completed", "response.incomplete")
    done = alice.responses.retrieve(bg.id)
    assert done.status == plain.status and done.output_text == _text(events) == plain.output_text
    assert done.usage.output_tokens == plain.usage.output_tokens
    tail = list(alice.responses.retrieve(bg.id, stream=True, starting_after=5))  # replayed from the store
    assert _shape(tail) == _shape(events[6:]) and tail[0].sequence_number == 6
    streamed = list(alice.responses.create(background=True, stream=True, **ask))  # created and streamed at once
    assert _shape(streamed) == _shape(events)


def test_cancel_stops_a_background_response_and_delete_forgets_it(daemon):
    alice = _api(daemon, "tok-a")
    ask = {"model": daemon.model_id, "input": "Tell a long story.", "max_output_tokens": 2000}
    bg = alice.responses.create(background=True, **ask)
    cancelled = alice.responses.cancel(bg.id)
    assert cancelled.status == "cancelled" and alice.responses.retrieve(bg.id).status == "cancelled"
    assert alice.responses.cancel(bg.id).status == "cancelled"  # once ended, it stays as it ended
    with daemon.client() as c:  # its request is gone from the process table
        assert all(row["state"] not in ("READY", "RUNNING") for row in c.ps()["requests"])
    fg = alice.responses.create(model=daemon.model_id, input="Hi.", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError):  # only a background response can be cancelled
        alice.responses.cancel(fg.id)
    alice.responses.delete(bg.id)
    for call in (alice.responses.retrieve, alice.responses.delete):
        with pytest.raises(openai.NotFoundError):
            call(bg.id)
    unstored = alice.responses.create(model=daemon.model_id, input="Hi.", max_output_tokens=2, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(unstored.id)


def test_stored_responses_are_bounded_per_identity(daemon):
    carol, alice = _api(daemon, "tok-c"), _api(daemon, "tok-a")
    mine = [carol.responses.create(model=daemon.model_id, input=f"Say {i}.", max_output_tokens=2) for i in range(4)]
    with pytest.raises(openai.NotFoundError):  # the oldest finished one made room (--max-stored-responses 3)
        carol.responses.retrieve(mine[0].id)
    assert [carol.responses.retrieve(r.id).id for r in mine[1:]] == [r.id for r in mine[1:]]
    with daemon.client() as c:
        assert c.stats()["responses"]["evicted"] >= 1
    assert alice.responses.create(model=daemon.model_id, input="Hi.", max_output_tokens=2).status  # others unaffected


def test_bad_stored_response_requests_are_4xx_and_the_daemon_keeps_serving(daemon):
    alice = _api(daemon, "tok-a")
    m = daemon.model_id
    fg = alice.responses.create(model=m, input="Hi.", max_output_tokens=2)
    bg = alice.responses.create(model=m, input="Hi.", max_output_tokens=2, background=True)
    list(alice.responses.retrieve(bg.id, stream=True))  # to its end
    bad = [
        lambda: alice.responses.retrieve(bg.id, stream=True, starting_after=10_000),  # past its last event
        lambda: alice.responses.retrieve(fg.id, stream=True),  # only a background one streams again
        lambda: alice.responses.create(model=m, input="Hi.", background=True, store=False),
        lambda: alice.responses.create(model=m, input="Hi.", previous_response_id="resp_nothing"),
        lambda: alice.responses.input_items.list(fg.id, limit=1000),
    ]
    for call in bad:
        with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as err:
            call()
        assert err.value.status_code in (400, 404) and err.value.body["message"]
    with daemon.client() as c:  # the protocol's own answers
        with pytest.raises(ClientError) as err:
            c.call(P.OP_RESPONSE_GET, response_id="no such id!")
        assert err.value.code == P.E_BAD_FIELD
        with pytest.raises(ClientError) as err:
            c.call(P.OP_RESPONSE_GET, response_id=bg.id)  # the socket's own identity is not alice
        assert err.value.code == P.E_NOT_FOUND
    assert alice.responses.create(model=m, input="still here?", max_output_tokens=2).usage.output_tokens == 2


def test_an_expired_response_is_gone(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, *FLAGS, "--http", "127.0.0.1:0", "--responses-keep-s", "0.001")
    api = d.openai()
    r = api.responses.create(model=tiny_model_dir.name, input="Hi.", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as err:
        api.responses.create(model=tiny_model_dir.name, input="And?", previous_response_id=r.id)
    assert err.value.body["param"] == "previous_response_id"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_background_stream_cut_by_a_daemon_sigkill_resumes_after_a_restart(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, *FLAGS, "--http", f"127.0.0.1:{_free_port()}")
    ask = {"model": tiny_model_dir.name, "input": "Tell a story.", "max_output_tokens": 60, "background": True}
    want = list(d.openai().responses.create(stream=True, **ask))  # uncrashed
    assert len(_text(want)) > 0 and len(want) > 12
    before, rid = [], None
    with d.openai().responses.create(stream=True, **ask) as stream:
        for ev in stream:
            before.append(ev)
            rid = rid or ev.response.id
            if ev.sequence_number >= 10:  # mid-stream: its text partly out
                break
    workers = psutil.Process(d.proc.pid).children(recursive=True)
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    assert not psutil.wait_procs(workers, 20)[1], "a worker outlived its daemon"
    d.daemon.start()  # the same state directory, endpoint and port
    d.proc = d.daemon.proc
    after = list(d.openai().responses.retrieve(rid, stream=True, starting_after=before[-1].sequence_number))
    both = before + after
    assert [e.sequence_number for e in both] == list(range(len(both)))  # none repeated, none missing
    assert _shape(both) == _shape(want) and _text(both) == _text(want)
    final = d.openai().responses.retrieve(rid)
    assert final.output_text == _text(want) and final.status == want[-1].response.status
    assert "event=recovered" in d.log()
