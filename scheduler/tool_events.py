"""What a follower of a request with tools is sent: content without the call markup, and calls as deltas.

The daemon keeps a request's raw text (the journal and resuming count on it); each token
event is turned, per follower, into the content it has not seen (``ipc.tool_stream``) and
the ``tool_call`` deltas that follow it.  A possible tag start held back at the very end is
content after all once the request is done: ``done`` carries it as ``content_tail``.
"""

from __future__ import annotations

from typing import Any

from ipc.tool_stream import Split, deltas, split
from scheduler.request import Request


def splits(req: Request) -> bool:
    """Whether ``req``'s text may hold tool calls to take out."""
    return req.params.calls_tools


def _names(req: Request) -> set[str]:
    return {t.get("function", t).get("name", "") for t in req.params.tools or []}


def _at(req: Request, chars: int, final: bool = False) -> Split:
    return split(req.text[:chars], _names(req), final)


def view(req: Request, had_chars: int) -> tuple[str, list[dict[str, Any]]]:
    """The content and the call deltas a follower that had ``had_chars`` raw characters gets now."""
    old, new = _at(req, had_chars), _at(req, len(req.text))
    return new.content[len(old.content) :], deltas(old, new, req.pid)


def tail(req: Request) -> str:
    """Content held back at the end (it looked like the start of a tag), for ``done``."""
    end = len(req.text)
    return _at(req, end, final=True).content[len(_at(req, end).content) :]
