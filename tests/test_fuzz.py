"""Property-based fuzzing (hypothesis) of the frame decoder and chat validation.

Whatever bytes or msgpack structures arrive, decoding and validation either succeed or raise
the protocol's own ``ProtocolError``: nothing else escapes to the daemon's loop.
"""

from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc import messages as M
from ipc import protocol as P

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", "x", ""]) | values
content = st.text(max_size=30) | values
message = st.fixed_dictionaries({"role": roles, "content": content}, optional={"tool_calls": values})
chat_fields = {
    "max_tokens": st.integers(-5, 40_000) | values,
    "min_tokens": values,
    "temperature": st.floats(-1, 3) | values,
    "top_p": values,
    "stop": st.lists(st.text(max_size=5), max_size=20) | values,
    "stream": values,
    "session": st.text(max_size=10) | values,
    "nice": st.integers(-30, 30) | values,
    "tools": st.lists(st.fixed_dictionaries({"type": values, "function": values}), max_size=3) | values,
    "tool_choice": st.sampled_from(["auto", "none", "required"]) | st.fixed_dictionaries({"function": values}),
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema"]) | values},
        optional={"json_schema": values},
    ),
}
chats = st.fixed_dictionaries(
    {"v": st.just(1), "op": st.just("chat"), "id": st.integers(0, 9) | st.text(max_size=4) | values},
    optional={"messages": st.lists(message, max_size=4) | values, **chat_fields},
)


def decodes_or_protocol_error(frames: list[bytes], worker: bool = False) -> None:
    try:
        if worker:
            M.read(frames, M.FROM_WORKER)
        else:
            M.read_agent(frames)
    except P.ProtocolError:
        pass


@SETTINGS
@given(st.binary(max_size=600))
def test_raw_bytes(frame):
    decodes_or_protocol_error([frame])
    decodes_or_protocol_error([frame], worker=True)


@SETTINGS
@given(values)
def test_any_structure(obj):
    frame = msgpack.packb(obj, use_bin_type=True)
    decodes_or_protocol_error([frame])
    decodes_or_protocol_error([frame], worker=True)


@SETTINGS
@given(st.sampled_from(P.AGENT_OPS), st.dictionaries(st.sampled_from(["pid", "nice", "wait", "id", "v"]), values))
def test_every_op_with_confused_fields(op, fields):
    decodes_or_protocol_error([msgpack.packb({"v": 1, "op": op, **fields}, use_bin_type=True)])


@SETTINGS
@given(chats)
def test_chat_validation(chat):
    decodes_or_protocol_error([msgpack.packb(chat, use_bin_type=True)])


token_rows = st.fixed_dictionaries({}, optional={"rid": values, "ids": values, "text": values, "n": values})


@SETTINGS
@given(st.lists(token_rows | values))
def test_step_tokens_rows(rows):
    """A batched worker's step: each row decodes as a ``tokens`` message of its own, or is refused."""
    rec = M.read([msgpack.packb({"v": 1, "op": P.W_STEP_TOKENS, "rows": rows}, use_bin_type=True)], M.FROM_WORKER)[0]
    for row in rec.rows:
        try:
            assert isinstance(M.StepTokens.record(row), M.Tokens)
        except P.ProtocolError:
            pass
