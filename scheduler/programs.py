"""Which agent program a request belongs to (Autellix's term), for policies that schedule per program.

An agent calls the model in a loop, resending its conversation each turn.  A client may name
its program (the protocol's ``session`` or ``agent``, HTTP's ``user``); a plain OpenAI client
names none, so the program is derived from the conversation's opening: its system message and
its first user message, which every later turn resends unchanged.  Programs live inside the
caller's identity: two identities never share one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ipc.chat_params import ChatParams

OPENING_CHARS = 4096  # of each opening message: enough to tell agents apart, bounded work per request


def _text(content: Any) -> str:
    """A message's content as text (OpenAI's parts joined), cut to ``OPENING_CHARS``."""
    if isinstance(content, str):
        return content[:OPENING_CHARS]
    return json.dumps(content, sort_keys=True, default=str)[:OPENING_CHARS]


def opening(params: ChatParams) -> str:
    """What every turn of a conversation starts with: the first system and the first user message."""
    messages = params.messages
    first = {}
    for m in messages:
        if isinstance(m, dict) and m.get("role") in ("system", "user") and m["role"] not in first:
            first[m["role"]] = _text(m.get("content"))
    if not first:  # a completion: its prompt's start
        prompt = params.prompt
        return _text(prompt if isinstance(prompt, str) else json.dumps(prompt)[:OPENING_CHARS])
    return json.dumps([first.get("system", ""), first.get("user", "")])


def program_of(params: ChatParams) -> str:
    """The program's name: ``session:``, ``agent:`` when the client named one, else ``conv:`` and a digest.

    A name is its owner's: policies key programs by owner and name (``program_key``).
    """
    if params.session:
        return f"session:{params.session}"
    if params.agent:
        return f"agent:{params.agent}"
    digest = hashlib.blake2b(opening(params).encode(), digest_size=6).hexdigest()
    return f"conv:{digest}"


def program_key(owner: str, program: str) -> str:
    """A program as policies count it: inside its owner's namespace, so no two identities share one."""
    return f"{owner}|{program}"
