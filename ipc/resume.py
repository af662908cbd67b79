"""What a client keeps of its open chats so that none is lost when the daemon restarts.

Each open chat has the message that sent it, its pid once accepted, and how much output
the caller has had (tokens, characters).  When the daemon goes silent, or says it hands a
request over (``shutting_down`` with ``resumable``), the client sends ``attach`` with those
counts: a new daemon that recovered the request from its journal streams the rest, and
nothing arrives twice.  A chat no daemon acknowledged is sent again.  ``Client`` and
``AsyncClient`` share this; it does no I/O itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ipc import events as E
from ipc import protocol as P


@dataclass
class OpenChat:
    msg: dict[str, Any]  # the chat as sent: sent again if no daemon ever acknowledged it
    pid: int | None = None
    tokens: int = 0  # the index of the last token event the caller had
    chars: int = 0  # characters of text the caller had
    attaching: bool = False  # an attach of ours is unanswered
    handed_over: bool = False  # its daemon is stopping and left it to the next one

    def attach(self) -> dict[str, Any]:
        self.attaching = True
        msg = {"op": P.OP_ATTACH, "id": self.msg["id"], "offset": self.tokens, "chars": self.chars}
        msg["stream"] = self.msg.get("stream") is not False  # a chat streams unless it said not to
        if self.pid is not None:
            msg["pid"] = self.pid
        return msg


class OpenChats:
    """``on=False``: a client that lives and dies with its daemon (the HTTP front) resumes nothing."""

    def __init__(self, on: bool = True) -> None:
        self.on = on
        self.open: dict[Any, OpenChat] = {}

    def track(self, msg: dict[str, Any]) -> None:
        if self.on:
            self.open[msg["id"]] = OpenChat(msg)

    def forget(self, cid: Any) -> None:
        self.open.pop(cid, None)

    @property
    def waiting(self) -> bool:
        """Some chat was handed over: a new daemon is expected soon (probe often)."""
        return any(o.handed_over for o in self.open.values())

    def probes(self) -> list[dict[str, Any]]:
        """The attach of every open chat (the daemon's answers also prove it is alive)."""
        return [o.attach() for o in self.open.values()]

    def take(self, ev: E.Event, wait: bool = True) -> tuple[bool, dict[str, Any] | None]:
        """Whether ``ev`` goes to the caller (not a repeat, nor an answer to our attach), and what to send back.

        ``wait=False`` (a client with a timeout of its own): a request handed over ends here, as
        its ``shutting_down`` error says, rather than waiting for the next daemon.
        """
        o = self.open.get(ev.id)
        if o is None:
            return True, None
        if isinstance(ev, E.Attached):
            o.pid, o.attaching, o.handed_over = ev.pid, False, False
            return False, None
        if isinstance(ev, E.Accepted):
            o.pid = ev.pid
        elif isinstance(ev, E.Token):
            if ev.index is not None and ev.index <= o.tokens:
                return False, None  # had it before the restart
            o.tokens = ev.index if ev.index is not None else o.tokens
            # raw characters (with tools, the text shown is less)
            o.chars = ev.chars if ev.chars is not None else o.chars + len(ev.text)
        elif isinstance(ev, E.Error) and ev.code == P.E_SHUTTING_DOWN and ev.resumable and wait:
            o.handed_over = True  # the next daemon finishes it: attach to that one
            return False, None
        elif isinstance(ev, E.Error) and ev.code == P.E_NOT_FOUND and o.attaching:
            o.attaching = False
            if o.pid is None:  # no daemon acknowledged it: send it again
                return False, dict(o.msg)
        if ev.terminal:
            self.open.pop(ev.id, None)
        return True, None
