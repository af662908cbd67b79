"""Typed records of what the daemon sends agents (``docs/protocol.md`` section 4).

The daemon builds one of these for every event and reply; a client decodes each message it
receives into one, once, where it arrives, and hands records on (``Client.events``,
``AsyncClient.events``, the HTTP front).  A record keeps the map it was decoded from as
``data``, for fields a newer daemon may add; code reads the typed attributes.  A field marked
``optional`` is left off the wire while it holds its default; the others are always sent
(``nil`` included), as the protocol table lists them.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ipc import protocol as P
from ipc.messages import field_kind


def optional(default: Any = None) -> Any:
    """A field left off the wire while it holds its default."""
    return field(default=default, metadata={"optional": True})


def _wire(name: str) -> Any:
    """A field whose wire name is a Python attribute's already (``Reply.data`` is taken by the raw map)."""
    return field(default_factory=dict, metadata={"wire": name})


@dataclass(frozen=True, slots=True)
class Event:
    """One message from the daemon: ``id`` is the request's (or call's) id, ``seq`` the daemon's counter."""

    EVENT: ClassVar[str] = ""
    STREAMED: ClassVar[bool] = False  # sent only to followers that stream (``stream: false`` skips it)
    id: Any = None
    seq: int = 0
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False, metadata={"raw": True})

    @property
    def event(self) -> str:
        return self.EVENT

    @property
    def terminal(self) -> bool:
        return self.EVENT in P.TERMINAL_EVENTS

    @property
    def text(self) -> str:
        return ""

    @classmethod
    def _spec(cls) -> list[tuple[dataclasses.Field, str, tuple[type, ...]]]:
        cached = cls.__dict__.get("_cached_spec")
        if cached is None:
            hints = typing.get_type_hints(cls)
            fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("raw")]
            cached = [(f, f.metadata.get("wire", f.name), field_kind(hints[f.name])[0]) for f in fields]
            type.__setattr__(cls, "_cached_spec", cached)
        return cached

    @classmethod
    def decode(cls, msg: Mapping[str, Any]) -> Event:
        """The record of a received map; a field of the wrong type is a ``ProtocolError``."""
        values: dict[str, Any] = {}
        for f, name, kind in cls._spec():
            value = P.field(msg, name, kind, None)
            if value is not None:
                values[f.name] = value
        return cls(**values, data=dict(msg))

    def encode(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.EVENT}
        for f, name, _ in self._spec():
            value = getattr(self, f.name)
            if not (f.metadata.get("optional") and value == f.default):
                out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class Accepted(Event):
    """A chat passed validation: always its first event."""

    EVENT: ClassVar[str] = P.EV_ACCEPTED
    pid: int = 0


@dataclass(frozen=True, slots=True)
class Token(Event):
    """Tokens and the text now safe to show; ``index`` counts the request's tokens so far (``None``: a replay)."""

    EVENT: ClassVar[str] = P.EV_TOKEN
    STREAMED: ClassVar[bool] = True
    pid: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    index: int | None = None
    chars: int | None = optional()
    logprobs: list | None = optional()


@dataclass(frozen=True, slots=True)
class ToolCall(Event):
    """One OpenAI-shaped streamed delta of a tool call."""

    EVENT: ClassVar[str] = P.EV_TOOL_CALL
    pid: int = 0
    tool_call: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Preempted(Event):
    EVENT: ClassVar[str] = P.EV_PREEMPTED
    STREAMED: ClassVar[bool] = True
    pid: int = 0
    quantum: int = 0
    tokens: int = 0
    context: str = ""


@dataclass(frozen=True, slots=True)
class Resumed(Event):
    """Started again, on ``worker``, from its context on tier ``context`` (``none``: rebuilt by prefill)."""

    EVENT: ClassVar[str] = P.EV_RESUMED
    STREAMED: ClassVar[bool] = True
    pid: int = 0
    worker: str = ""
    context: str = ""
    tokens: int = 0
    migrated: bool | None = optional()
    direct: bool | None = optional()


@dataclass(frozen=True, slots=True)
class Done(Event):
    EVENT: ClassVar[str] = P.EV_DONE
    pid: int = 0
    worker: str = ""
    text: str = ""
    finish_reason: str = ""
    content: str | None = None
    tool_calls: list = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    logprobs: list | None = optional()
    content_tail: str | None = optional()


@dataclass(frozen=True, slots=True)
class Error(Event):
    """A rejection (no ``pid``) or the terminal event of an accepted chat (``pid``, its ``text`` so far)."""

    EVENT: ClassVar[str] = P.EV_ERROR
    code: str = P.E_INTERNAL
    message: str = ""
    pid: int | None = optional()
    text: str = ""  # sent with a ``pid`` only
    stats: dict[str, Any] | None = optional()
    resumable: bool | None = optional()

    def encode(self) -> dict[str, Any]:
        out = Event.encode(self)
        if self.pid is None:
            del out["text"]
        return out


@dataclass(frozen=True, slots=True)
class Cancelled(Event):
    EVENT: ClassVar[str] = P.EV_CANCELLED
    pid: int = 0
    message: str = ""
    text: str = ""
    stats: dict[str, Any] | None = optional()


@dataclass(frozen=True, slots=True)
class Attached(Event):
    """The answer to ``attach``: the request's pid and state (``ENDED``: its end is replayed from the journal)."""

    EVENT: ClassVar[str] = P.EV_ATTACHED
    pid: int = 0
    state: str = ""
    tokens: int | None = optional()
    recovered: bool | None = optional()


@dataclass(frozen=True, slots=True)
class Reply(Event):
    """The one answer to ``ps``, ``kill``, ``ping``, ``nice``, ``stats``, ``workers``, ``tokenize``, ..."""

    EVENT: ClassVar[str] = P.EV_REPLY
    answer: dict[str, Any] = _wire("data")


@dataclass(frozen=True, slots=True)
class Other(Event):
    """An event this client does not know (a newer daemon's): its map, untouched."""

    @property
    def event(self) -> str:
        return str(self.data.get("event", ""))

    @property
    def terminal(self) -> bool:
        return self.event in P.TERMINAL_EVENTS

    def encode(self) -> dict[str, Any]:
        return dict(self.data)


KINDS: dict[str, type[Event]] = {
    c.EVENT: c for c in (Accepted, Token, ToolCall, Preempted, Resumed, Done, Error, Cancelled, Attached, Reply)
}


def decode(msg: Mapping[str, Any]) -> Event:
    """The record of a message from the daemon, by its ``event``."""
    return KINDS.get(msg.get("event"), Other).decode(msg)
