"""The wire protocol's decoding and validation, without sockets."""

import msgpack
import pytest

from ipc import protocol as P
from ipc.chat_params import parse_chat


def chat(**kw):
    return {"v": 1, "op": "chat", "id": 1, "messages": [{"role": "user", "content": "hi"}], **kw}


def test_roundtrip_stamps_version():
    msg = P.unpack(P.pack({"op": "ping"}))
    assert msg == {"op": "ping", "v": P.VERSION}


@pytest.mark.parametrize(
    "frame,code",
    [
        (b"\xc1", P.E_BAD_FRAME),  # never-used msgpack byte
        (b"\x93\x01\x02", P.E_BAD_FRAME),  # truncated array
        (msgpack.packb([1, 2, 3]), P.E_BAD_FRAME),  # not a map
        (msgpack.packb({1: 2}), P.E_BAD_FRAME),  # int key
        (msgpack.packb({"v": 99, "op": "ping"}), P.E_BAD_VERSION),
        (msgpack.packb({"v": 1, "op": 7}), P.E_BAD_FIELD),
        (msgpack.packb({"v": 1, "op": "x"}) + b"\x00", P.E_BAD_FRAME),  # extra data
        (b"\x91" * 5000, P.E_BAD_FRAME),  # deeply nested
        (b"\x00" * (P.MAX_FRAME + 1), P.E_TOO_LARGE),
    ],
)
def test_bad_frames_raise_protocol_error(frame, code):
    with pytest.raises(P.ProtocolError) as err:
        P.unpack(frame)
    assert err.value.code == code


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": -1},
        {"max_tokens": 0},
        {"max_tokens": 10**9},
        {"max_tokens": "12"},
        {"max_tokens": True},
        {"temperature": -0.5},
        {"top_p": 0},
        {"stop": [""]},
        {"stop": ["x"] * 100},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": "hello"},
        {"seed": -3},
    ],
)
def test_bad_chat_fields(fields):
    with pytest.raises(P.ProtocolError) as err:
        parse_chat(chat(**fields))
    assert err.value.code == P.E_BAD_FIELD


def test_chat_defaults():
    p = parse_chat(chat(stop="END"))
    assert p["max_tokens"] == 256 and p["temperature"] == 0.0 and p["stop"] == ["END"] and p["stream"] is True


def test_clients_refuse_a_frame_the_daemon_could_not_take():
    """Over MAX_FRAME, ZeroMQ would drop the whole connection (every request on it): refuse before sending."""
    from ipc.client import ClientError, frame_of

    assert P.unpack(frame_of({"op": "ping", "id": 1}))["op"] == "ping"
    with pytest.raises(ClientError) as big:
        frame_of(chat(temperature=0.5, stop=[1.5] * 500_000))  # JSON-sized, but 9 bytes a float in msgpack
    assert big.value.code == P.E_TOO_LARGE
    with pytest.raises(ClientError) as odd:
        frame_of(chat(seed=2**70))
    assert odd.value.code == P.E_BAD_FIELD
