"""Typed records of the wire's messages, decoded and validated once, where they arrive.

A record's fields are its wire fields (``docs/protocol.md``); the type hints say what each
must hold, and a field with a default may be missing (or ``null``).  ``decode`` turns a
received map into a record or raises ``ProtocolError``; ``encode`` turns a record back into
the map ``protocol.pack`` sends.  Raw tensor frames never ride inside a record: they travel
beside it (``read`` returns them next to the record).  Handlers receive records, not dicts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ipc import protocol as P
from ipc.chat_params import ChatParams, parse_chat, parse_messages


@dataclass(frozen=True, slots=True)
class Quantum:
    """A time slice: tokens (deterministic, for tests) and/or milliseconds; neither = no limit."""

    tokens: int | None = None
    ms: float | None = None

    @property
    def infinite(self) -> bool:
        return self.tokens is None and self.ms is None


# ---- the machinery: one decoder and one encoder for every record -------------------------------
def field_kind(hint: Any) -> tuple[tuple[type, ...], bool]:
    """The accepted Python types of a field's hint, and whether each list item must be an int."""
    if hint is Any:
        return (object,), False
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = [a for a in args if a is not type(None)]
        return field_kind(inner)
    origin = typing.get_origin(hint) or hint
    ints = origin is list and args == (int,)
    return ((int, float) if origin is float else (origin,)), ints


class Message:
    """Base of the records: ``OP`` is the value of the header field that selects the record."""

    OP: ClassVar[str] = ""
    HEADER: ClassVar[str] = "op"

    @classmethod
    def _fields(cls) -> list[tuple[dataclasses.Field, tuple[type, ...], bool]]:
        cached = cls.__dict__.get("_spec")
        if cached is None:
            hints = typing.get_type_hints(cls)
            cached = [(f, *field_kind(hints[f.name])) for f in dataclasses.fields(cls)]
            cls._spec = cached  # type: ignore[attr-defined]
        return cached

    @classmethod
    def decode(cls, msg: Mapping[str, Any]) -> Message:
        values: dict[str, Any] = {}
        for f, kind, ints in cls._fields():
            if kind == (Quantum,):
                values[f.name] = Quantum(
                    P.field(msg, "quantum_tokens", int, None), P.field(msg, "quantum_ms", (int, float), None)
                )
                continue
            if kind == (ChatParams,):  # checked where the chat came in: a worker reads its daemon's map back
                values[f.name] = ChatParams.from_wire(P.field(msg, f.name, dict))
                continue
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            value = P.field(msg, f.name, kind, ... if not has_default else None)
            if value is None:
                continue  # the record's default
            if ints and any(type(x) is not int for x in value):
                raise P.ProtocolError(P.E_BAD_FIELD, f"field '{f.name}' must be a list of integers")
            values[f.name] = float(value) if kind == (int, float) else value
        return cls(**values)

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {self.HEADER: self.OP}
        for f, _, _ in self._fields():
            value = getattr(self, f.name)
            if isinstance(value, Quantum):
                out["quantum_tokens"], out["quantum_ms"] = value.tokens, value.ms
            elif isinstance(value, ChatParams):
                out[f.name] = value.wire()
            elif isinstance(value, Keep):
                out.update(value.wire())
            elif value is not None:
                out[f.name] = value
        return out


def decode(msg: Mapping[str, Any], table: Mapping[str, type[Message]]) -> Message:
    """The record a received map stands for, by its op; an unknown op is a ``ProtocolError``."""
    cls = table.get(msg["op"])
    if cls is None:
        raise P.ProtocolError(P.E_UNKNOWN_OP, f"unknown op {msg['op']!r}")
    return cls.decode(msg)


def read(frames: list, table: Mapping[str, type[Message]], max_size: int = P.MAX_FRAME) -> tuple[Message, list]:
    """A multipart message: the record from its first frame, and the raw frames that follow it."""
    if not frames:
        raise P.ProtocolError(P.E_BAD_FRAME, "an empty message")
    head = frames[0]
    data = head.bytes if hasattr(head, "bytes") else head
    return decode(P.unpack(data, max_size=max_size), table), list(frames[1:])


def _table(*classes: type[Message]) -> dict[str, type[Message]]:
    return {c.OP: c for c in classes}


def _count(value: Any) -> int | None:
    """A non-negative count from a map a peer filled, which the daemon never trusts to be well-typed."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _map(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


# ---- worker -> daemon -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready(Message):
    """A worker is up: what it runs and what it can do (its capabilities)."""

    OP: ClassVar[str] = P.W_READY
    worker: str = ""
    slots: int = 1
    device: str = "?"
    model: str = ""
    pid: int = 0
    preemptible: bool = True  # False: its requests run to the end of their turn (an endpoint that cannot resume)
    peer: str | None = None  # the worker's inbox for contexts pushed by other workers
    max_context: int = 0  # the most tokens one request may hold (0: not known)
    tokenizer: str = ""  # directory of its tokenizer: the daemon counts prompts as the worker will
    orphans: list[int] = field(default_factory=list)  # requests whose context files a dead worker left here


@dataclass(frozen=True, slots=True)
class Load:
    """The figures of a heartbeat the daemon shows (``workers``, metrics), each checked to be a count."""

    memory: dict[str, int | None]
    contexts: dict[str, int | None]
    rss_bytes: int | None = None
    host_available_bytes: int | None = None
    prefill_tokens: int | None = None
    decode_tokens: int | None = None
    prefill_steps: int | None = None
    cache: dict[str, int | None] = field(default_factory=dict)  # the prefix/conversation cache (``CACHE_KEYS``)


CACHE_KEYS = ("prefix_bytes", "prefix_budget", "prefix_entries", "prefix_hits", "prefix_tokens_reused")


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    OP: ClassVar[str] = P.W_HEARTBEAT
    stats: dict = field(default_factory=dict)

    def load(self) -> Load:
        tiers = _map(_map(self.stats.get("contexts")).get("tiers"))
        return Load(
            memory={t: _count(_map(tiers.get(t)).get("bytes")) or 0 for t in P.TIERS},
            contexts={t: _count(_map(tiers.get(t)).get("count")) or 0 for t in P.TIERS},
            **{k: _count(self.stats.get(k)) for k in ("rss_bytes", "host_available_bytes")},
            **{k: _count(self.stats.get(k)) for k in ("prefill_tokens", "decode_tokens", "prefill_steps")},
            cache={k.removeprefix("prefix_"): _count(self.stats.get(k)) for k in CACHE_KEYS},
        )


@dataclass(frozen=True, slots=True)
class Tokens(Message):
    """Output of a running request: token ids (local engines) and/or text; ``n`` counts tokens without ids."""

    OP: ClassVar[str] = P.W_TOKENS
    rid: int
    ids: list[int] = field(default_factory=list)
    text: str = ""
    n: int | None = None
    logprobs: list = field(default_factory=list)  # per id, OpenAI-shaped (``logprobs`` asked for)

    @property
    def count(self) -> int:
        return max(0, self.n) if self.n is not None else len(self.ids)


@dataclass(frozen=True, slots=True)
class StepTokens(Message):
    """Several rows' ``tokens`` records in one message: a batched worker's output of a step."""

    OP: ClassVar[str] = P.W_STEP_TOKENS
    rows: list = field(default_factory=list)  # maps, each as a ``tokens`` message

    @staticmethod
    def record(row: Any) -> Tokens:
        """One row as a ``Tokens`` record, validated as a ``tokens`` message of its own."""
        if not isinstance(row, Mapping):
            raise P.ProtocolError(P.E_BAD_FIELD, "field 'rows' must hold maps")
        return Tokens.decode(row)


@dataclass(frozen=True, slots=True)
class QuantumEnd(Message):
    """A running request used up its quantum: the worker asks whether it yields."""

    OP: ClassVar[str] = P.W_QUANTUM_END
    rid: int
    emitted: int
    prompt_tokens: int | None = None  # exact, from the worker's tokenizer
    preemptible: bool | None = None
    prompt_reused: int | None = None  # of those, the ones whose state was reused (not computed)


@dataclass(frozen=True, slots=True)
class Preempted(Message):
    """The worker saved a request's context and freed its slot."""

    OP: ClassVar[str] = P.W_PREEMPTED
    rid: int
    tier: str
    bytes: int = 0
    switch_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Context(Message):
    """A saved context moved to another tier (memory pressure)."""

    OP: ClassVar[str] = P.W_CONTEXT
    rid: int
    tier: str
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class Finished(Message):
    OP: ClassVar[str] = P.W_FINISHED
    rid: int
    finish_reason: str
    content: str | None = None
    tool_calls: list = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    session_kept: bool = False

    @property
    def prompt_tokens(self) -> int | None:
        """The exact prompt length, when the worker reported one."""
        return _count(self.usage.get("prompt_tokens"))

    @property
    def prompt_reused(self) -> int | None:
        """How many prompt tokens' state was reused, when the worker reported it."""
        return _count(self.stats.get("prompt_tokens_reused"))


@dataclass(frozen=True, slots=True)
class Failed(Message):
    OP: ClassVar[str] = P.W_FAILED
    rid: int
    code: str = P.E_WORKER_FAILED
    message: str = "worker failed"

    @property
    def agent_code(self) -> str:
        """The code the agent sees: a worker may pass only a few of its own through."""
        return self.code if self.code in P.WORKER_CODES else P.E_WORKER_FAILED


@dataclass(frozen=True, slots=True)
class Exported(Message):
    """A context handed over for migration: its tensors follow as frames, or went straight to the importer."""

    OP: ClassVar[str] = P.W_EXPORTED
    rid: int
    lost: bool = False  # the worker no longer had the context
    migrate: dict | None = None  # the request's counters, for the importer
    tensors: list = field(default_factory=list)  # dtype/shape header of each frame

    @property
    def direct(self) -> bool:
        return _map(self.migrate).get("direct") is True


# ---- daemon -> worker -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Run(Message):
    """Run a request: everything a worker without its context needs to rebuild it from the tokens."""

    OP: ClassVar[str] = P.D_RUN
    rid: int
    params: ChatParams
    quantum: Quantum = Quantum()
    resume_ids: list[int] = field(default_factory=list)  # tokens already streamed
    resume_text: str = ""
    resume_tokens: int = 0
    emitted_chars: int = 0
    migrate: dict | None = None  # the exporter's counters: the context migrates in
    tensors: list = field(default_factory=list)
    owner: str = ""  # the identity it runs for (a worker's cached states are kept per identity)


@dataclass(frozen=True, slots=True)
class Continue(Message):
    """Keep the slot for one more quantum."""

    OP: ClassVar[str] = P.D_CONTINUE
    rid: int
    quantum: Quantum = Quantum()


@dataclass(frozen=True, slots=True)
class Preempt(Message):
    OP: ClassVar[str] = P.D_PREEMPT
    rid: int


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    OP: ClassVar[str] = P.D_CANCEL
    rid: int


@dataclass(frozen=True, slots=True)
class Export(Message):
    """Hand a saved context over for migration; ``peer`` is the importer's inbox, if it has one."""

    OP: ClassVar[str] = P.D_EXPORT
    rid: int
    peer: str | None = None


@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    OP: ClassVar[str] = P.D_SHUTDOWN


@dataclass(frozen=True, slots=True)
class Pushed(Message):
    """Worker to worker: a migrating context's tensors, pushed into the importer's inbox."""

    OP: ClassVar[str] = P.W_CONTEXT
    rid: int
    tensors: list


@dataclass(frozen=True, slots=True)
class Carried(Message):
    """What a local engine's migrating context carries in ``Exported.migrate`` and ``Run.migrate``.

    The request's worker counters, ``layers`` (the (keys, values) pairs among the tensor frames,
    which end with the last logits; 0: no KV came along, the importer recomputes) and ``direct``
    (the frames were pushed to the importer's inbox, not relayed).  Not a message of its own:
    ``of`` reads the map, ``encode`` gives it back (without an op).
    """

    prefill_computed: int = 0
    decode_computed: int = 0
    restores: int = 0
    reused: int = 0
    switch_s: float = 0.0
    layers: int = 0
    direct: bool = False

    @classmethod
    def of(cls, migrate: Mapping[str, Any] | None) -> Carried:
        return cls.decode(migrate or {})  # type: ignore[return-value]

    def encode(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not self.direct:
            del out["direct"]
        return out


FROM_WORKER = _table(Ready, Heartbeat, Tokens, StepTokens, QuantumEnd, Preempted, Context, Finished, Failed, Exported)
TO_WORKER = _table(Run, Continue, Preempt, Cancel, Export, Shutdown)
PEER = _table(Pushed)


# ---- agent -> daemon --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Keep:
    """A chat's ``response``: the Responses API object it runs, stored by the daemon under ``id``.

    ``record`` and ``input`` are the HTTP front's (the daemon keeps them as given); ``background``:
    the request runs whether or not anyone follows it, and ``response_get`` reads how it goes.
    """

    id: str
    record: dict
    input: list
    background: bool = False

    @classmethod
    def read(cls, msg: Mapping[str, Any]) -> Keep | None:
        raw = P.field(dict(msg), "response", dict, None)
        background = P.field(dict(msg), "background", bool, False)
        if raw is None:
            if background:
                raise P.ProtocolError(P.E_BAD_FIELD, "'background' needs a stored 'response'")
            return None
        return cls(response_id(raw), P.field(raw, "record", dict), P.field(raw, "input", list), background)

    def wire(self) -> dict[str, Any]:
        return {"response": {"id": self.id, "record": self.record, "input": self.input}, "background": self.background}


def response_id(msg: Mapping[str, Any], name: str = "id") -> str:
    rid = P.field(dict(msg), name, str)
    if not (0 < len(rid) <= 128 and rid.replace("_", "").replace("-", "").isalnum() and rid.isascii()):
        raise P.ProtocolError(P.E_BAD_FIELD, f"'{name}' is 1..128 letters, digits, '_' and '-'")
    return rid


@dataclass(frozen=True, slots=True)
class Chat(Message):
    OP: ClassVar[str] = P.OP_CHAT
    params: ChatParams
    response: Keep | None = None  # a stored response it runs (the HTTP front's Responses API)

    @classmethod
    def decode(cls, msg: Mapping[str, Any]) -> Chat:
        return cls(parse_chat(dict(msg)), Keep.read(msg))


@dataclass(frozen=True, slots=True)
class Ps(Message):
    OP: ClassVar[str] = P.OP_PS


@dataclass(frozen=True, slots=True)
class Kill(Message):
    OP: ClassVar[str] = P.OP_KILL
    pid: int


@dataclass(frozen=True, slots=True)
class Nice(Message):
    OP: ClassVar[str] = P.OP_NICE
    pid: int
    nice: int

    @classmethod
    def decode(cls, msg: Mapping[str, Any]) -> Nice:
        return cls(P.field(msg, "pid", int), P.number(msg, "nice", P.NICE_MIN, P.NICE_MAX, ..., integer=True))


@dataclass(frozen=True, slots=True)
class CancelOwn(Message):
    """An agent cancels its own request, named by the request's ``id``."""

    OP: ClassVar[str] = P.OP_CANCEL


@dataclass(frozen=True, slots=True)
class Attach(Message):
    """Follow a request from ``offset`` tokens (``chars`` characters) on: the rest streams under this ``id``.

    Without ``pid`` the request is the caller's own chat of this ``id`` (what a client that
    reconnects after a daemon restart asks for); with it, any request the caller may see.
    """

    OP: ClassVar[str] = P.OP_ATTACH
    pid: int | None = None
    offset: int = 0
    chars: int = 0
    stream: bool = True
    on_behalf_of: str | None = None  # the HTTP front attaches for its bearer token's identity (admins only)

    @classmethod
    def decode(cls, msg: Mapping[str, Any]) -> Attach:
        return cls(
            P.field(msg, "pid", int, None),
            P.number(msg, "offset", 0, 1 << 31, 0, integer=True),
            P.number(msg, "chars", 0, 1 << 40, 0, integer=True),
            P.field(msg, "stream", bool, True),
            P.field(msg, "on_behalf_of", str, None),
        )


@dataclass(frozen=True, slots=True)
class Ping(Message):
    OP: ClassVar[str] = P.OP_PING
    wait: bool = False  # answer once every worker is up


@dataclass(frozen=True, slots=True)
class Stats(Message):
    OP: ClassVar[str] = P.OP_STATS


@dataclass(frozen=True, slots=True)
class Workers(Message):
    OP: ClassVar[str] = P.OP_WORKERS


@dataclass(frozen=True, slots=True)
class Tokenize(Message):
    """Token ids of ``prompt``, or of ``messages`` rendered with the model's chat template (vLLM's ``/tokenize``)."""

    OP: ClassVar[str] = P.OP_TOKENIZE
    prompt: str | None = None
    messages: list | None = None
    add_special_tokens: bool = True  # for a prompt: the tokenizer's own BOS/EOS, if it adds any
    add_generation_prompt: bool = True  # for messages: end with the assistant's turn opening, as a chat does

    @classmethod
    def decode(cls, msg: Mapping[str, Any]) -> Tokenize:
        prompt, messages = P.field(msg, "prompt", str, None), P.field(msg, "messages", list, None)
        if (prompt is None) == (messages is None):
            raise P.ProtocolError(P.E_BAD_FIELD, "a tokenize needs exactly one of 'prompt' and 'messages'")
        return cls(
            prompt,
            None if messages is None else parse_messages(messages),
            P.field(msg, "add_special_tokens", bool, True),
            P.field(msg, "add_generation_prompt", bool, True),
        )


@dataclass(frozen=True, slots=True)
class Detokenize(Message):
    OP: ClassVar[str] = P.OP_DETOKENIZE
    tokens: list[int]


@dataclass(frozen=True, slots=True)
class ResponseGet(Message):
    """A stored response of the caller's (or of ``on_behalf_of``'s, asked by an admin: the HTTP front)."""

    OP: ClassVar[str] = P.OP_RESPONSE_GET
    response_id: str
    on_behalf_of: str | None = None

    @classmethod
    def decode(cls, msg: Mapping[str, Any]) -> ResponseGet:
        return cls(response_id(msg, "response_id"), P.field(dict(msg), "on_behalf_of", str, None))


@dataclass(frozen=True, slots=True)
class ResponseDelete(ResponseGet):
    OP: ClassVar[str] = P.OP_RESPONSE_DELETE


@dataclass(frozen=True, slots=True)
class ResponseCancel(ResponseGet):
    OP: ClassVar[str] = P.OP_RESPONSE_CANCEL


FROM_AGENT = _table(
    Chat,
    Ps,
    Kill,
    Nice,
    CancelOwn,
    Ping,
    Stats,
    Workers,
    Attach,
    Tokenize,
    Detokenize,
    ResponseGet,
    ResponseDelete,
    ResponseCancel,
)


class AgentError(P.ProtocolError):
    """Bad input from an agent, with the request id to answer under (None when it could not be read)."""

    def __init__(self, code: str, message: str, cid: Any = None):
        super().__init__(code, message)
        self.cid = cid


def read_agent(frames: list[bytes]) -> tuple[Any, Message]:
    """An agent's message (after its routing id): the agent's request id and the record."""
    if len(frames) != 1:
        raise AgentError(P.E_BAD_FRAME, f"expected 1 frame after the routing id, got {len(frames)}")
    try:
        msg = P.unpack(frames[0])
    except P.ProtocolError as exc:
        raise AgentError(exc.code, exc.message) from None
    cid = msg.get("id")
    if isinstance(cid, bool) or not isinstance(cid, (str, int, type(None))):
        raise AgentError(P.E_BAD_FIELD, "field 'id' must be a string or an integer")
    cls = FROM_AGENT.get(msg["op"])
    if cls is None:
        raise AgentError(P.E_UNKNOWN_OP, f"unknown op {msg['op']!r}; known: {', '.join(P.AGENT_OPS)}", cid)
    try:
        return cid, cls.decode(msg)
    except P.ProtocolError as exc:
        raise AgentError(exc.code, exc.message, cid) from None
