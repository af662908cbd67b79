"""Wire protocol constants and the one place where bytes become messages.

Every message is a msgpack map in one frame, optionally followed by raw tensor frames
(worker side only).  Decoding is defensive: anything that is not a well-formed map of
the right version raises ``ProtocolError`` carrying an error code, never an assert,
so the daemon can answer bad input with an error reply and keep serving.
See ``docs/protocol.md`` for the full specification.
"""

from __future__ import annotations

from typing import Any

import msgpack

VERSION = 1

# Limits (bytes / counts).  The agent socket also sets ZMQ MAXMSGSIZE to MAX_FRAME.
MAX_FRAME = 4 * 1024 * 1024
MAX_TENSOR_FRAME = 1024 * 1024 * 1024
# Kernel send/receive buffers of the sockets that carry tensor frames (the worker sockets): with the
# default ones a 22.7 MiB context took 6.1 ms per ipc:// hop here, with 4 MiB ones 4.6 ms (measured).
BULK_SOCKET_BUFFER = 4 * 1024 * 1024
MAX_STR = 1024 * 1024
MAX_ARRAY = 100_000
MAX_MAP = 1024
MAX_MESSAGES = 1024
MAX_STOP = 16
MAX_TOKENS_LIMIT = 32768  # keeps a done event's text well under MAX_STR
# Prompt tokens a worker feeds per step (chunked prefill).  16 chat prompts of ~60 tokens fit one
# forward: at 512 they were split in two, and the benchmark's 16-slot pass lost ~5% of its
# throughput to the smaller prefill batches.  The price is a longer step for running rows when
# prompts arrive (~0.8 s for 1024 tokens of SmolLM2 on 2 CPU cores, against a 67 ms decode step).
DEFAULT_PREFILL_CHUNK = 1024

# Agent -> daemon ops.
OP_CHAT = "chat"
OP_PS = "ps"
OP_KILL = "kill"
OP_PING = "ping"
OP_CANCEL = "cancel"
OP_NICE = "nice"
OP_STATS = "stats"
OP_WORKERS = "workers"
OP_ATTACH = "attach"  # follow a request by id (or pid) from an offset: resume after a reconnect, or watch another's
OP_TOKENIZE = "tokenize"  # token ids of a text or of a chat, with the model's tokenizer and template
OP_DETOKENIZE = "detokenize"  # the text of token ids
OP_RESPONSE_GET = "response_get"  # a stored response (Responses API): its record, input and end
OP_RESPONSE_DELETE = "response_delete"
OP_RESPONSE_CANCEL = "response_cancel"  # stop the request a stored (background) response runs
AGENT_OPS = (
    OP_CHAT, OP_PS, OP_KILL, OP_PING, OP_CANCEL, OP_NICE, OP_STATS, OP_WORKERS, OP_ATTACH, OP_TOKENIZE, OP_DETOKENIZE,
    OP_RESPONSE_GET, OP_RESPONSE_DELETE, OP_RESPONSE_CANCEL,
)  # fmt: skip

NICE_MIN, NICE_MAX = -20, 19  # a request's nice value, as in Unix: lower runs first

# Daemon -> agent events.
EV_ACCEPTED = "accepted"
EV_TOKEN = "token"
EV_PREEMPTED = "preempted"
EV_RESUMED = "resumed"
EV_DONE = "done"
EV_ERROR = "error"
EV_CANCELLED = "cancelled"
EV_REPLY = "reply"
EV_TOOL_CALL = "tool_call"  # a tool call's delta, streamed: its id and name first, then its arguments' text
EV_ATTACHED = "attached"  # the answer to ``attach``: the request's pid, state and tokens so far
TERMINAL_EVENTS = (EV_DONE, EV_ERROR, EV_CANCELLED)

# Worker <-> daemon ops.
W_READY = "ready"
W_HEARTBEAT = "heartbeat"
W_TOKENS = "tokens"
W_STEP_TOKENS = "step_tokens"  # several rows' ``tokens`` in one message (one per decode step)
W_QUANTUM_END = "quantum_end"
W_PREEMPTED = "preempted"
W_FINISHED = "finished"
W_FAILED = "failed"
W_CONTEXT = "context"
W_EXPORTED = "exported"
D_RUN = "run"
D_CONTINUE = "continue"
D_PREEMPT = "preempt"
D_CANCEL = "cancel"
D_SHUTDOWN = "shutdown"
D_EXPORT = "export"

# Error codes carried by ``error`` events.
E_BAD_FRAME = "bad_frame"
E_BAD_VERSION = "bad_version"
E_UNKNOWN_OP = "unknown_op"
E_BAD_FIELD = "bad_field"
E_TOO_LARGE = "too_large"
E_NOT_FOUND = "not_found"
E_DUPLICATE_ID = "duplicate_id"
E_WORKER_FAILED = "worker_failed"
E_SHUTTING_DOWN = "shutting_down"
E_INTERNAL = "internal"
E_REMOTE = "remote_error"  # an API endpoint failed (its status is in the message and ``status``)
E_CONTEXT_LENGTH = "context_length_exceeded"  # the prompt does not fit the model's context (before any compute)
E_INVALID_OUTPUT = "invalid_output"  # an endpoint returned text that breaks the requested JSON format
E_QUOTA = "quota_exceeded"  # the identity's live requests or their tokens are at its limit
E_RATE_LIMITED = "rate_limited"  # the connection sends more messages per second than it may
E_UNSUPPORTED = "unsupported_parameter"  # a known field, or a value of one, this daemon does not do: never dropped
# codes a worker may pass through to the agent
WORKER_CODES = (E_REMOTE, E_INVALID_OUTPUT, E_CONTEXT_LENGTH, E_UNSUPPORTED, E_BAD_FIELD)

# Context tiers reported by workers.
TIER_DEVICE = "device"
TIER_HOST = "host"
TIER_DISK = "disk"
TIER_RECOMPUTE = "recompute"
TIER_NONE = "none"
TIERS = (TIER_DEVICE, TIER_HOST, TIER_DISK, TIER_RECOMPUTE)  # where a saved context can be, fastest to resume first


class ProtocolError(Exception):
    """Bad input from a peer; ``code`` is one of the ``E_*`` constants."""

    MAX_MESSAGE = 300  # messages quote the peer's input: a 1 MiB op name must not come back (or go to the log) whole

    def __init__(self, code: str, message: str):
        if len(message) > self.MAX_MESSAGE:
            message = message[: self.MAX_MESSAGE] + f"... ({len(message)} characters)"
        super().__init__(message)
        self.code = code
        self.message = message


def pack(msg: dict[str, Any]) -> bytes:
    """Serialize one message map, stamping the protocol version."""
    msg.setdefault("v", VERSION)
    return msgpack.packb(msg, use_bin_type=True)


MAX_DEPTH = 1024  # msgpack's own limit on nesting (arrays and maps within each other)
LIMIT_NAMES = {
    "max_str_len": "a string",
    "max_array_len": "an array",
    "max_map_len": "a map",
    "max_bin_len": "a binary",
}


def _why(exc: Exception) -> str:
    """Which decoder limit or rule a frame broke, in words (msgpack's own, where it has some)."""
    if isinstance(exc, msgpack.StackError):
        return f"nested more than {MAX_DEPTH} levels deep"
    if isinstance(exc, msgpack.ExtraData):
        return "bytes after the message (one message per frame)"
    if isinstance(exc, msgpack.FormatError):
        return "not msgpack (a reserved or invalid type byte)"
    text = str(exc) or type(exc).__name__
    for name, what in LIMIT_NAMES.items():
        if name in text:
            return f"{what} longer than allowed: {text}"
    return text


def unpack(frame: bytes, max_size: int = MAX_FRAME, header: str = "op") -> dict[str, Any]:
    """Decode one frame into a message map or raise ``ProtocolError``.

    ``header`` names the string field a receiver dispatches on: ``op`` for requests,
    ``event`` for what the daemon sends to agents.
    """
    if len(frame) > max_size:
        raise ProtocolError(E_TOO_LARGE, f"frame of {len(frame)} bytes exceeds {max_size}")
    try:
        msg = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_STR,
            max_bin_len=max_size,
            max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(E_BAD_FRAME, f"undecodable msgpack frame: {_why(exc)}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(E_BAD_FRAME, "a message must be a msgpack map")
    version = msg.get("v")
    if type(version) is not int or version != VERSION:
        raise ProtocolError(E_BAD_VERSION, f"protocol version {version!r} unsupported (want {VERSION})")
    if not isinstance(msg.get(header), str):
        raise ProtocolError(E_BAD_FIELD, f"field '{header}' must be a string")
    return msg


def field(msg: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Fetch a typed field; missing or wrong-typed fields raise ``ProtocolError``."""
    if name not in msg or msg[name] is None:
        if default is ...:
            raise ProtocolError(E_BAD_FIELD, f"missing field '{name}'")
        return default
    value = msg[name]
    # bool is an int subclass: refuse it where a number is wanted.
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds and object not in kinds:
        raise ProtocolError(E_BAD_FIELD, f"field '{name}' has wrong type bool")
    if not isinstance(value, kind):
        raise ProtocolError(E_BAD_FIELD, f"field '{name}' has wrong type {type(value).__name__}")
    return value


def number(msg: dict[str, Any], name: str, lo: float, hi: float, default: Any, integer: bool = False) -> Any:
    """Fetch a numeric field and check it lies in [lo, hi]."""
    value = field(msg, name, int if integer else (int, float), default)
    if value is None:
        return None
    if not lo <= value <= hi:
        raise ProtocolError(E_BAD_FIELD, f"field '{name}'={value} out of range [{lo}, {hi}]")
    return value
