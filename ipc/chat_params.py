"""Validation of a chat syscall's parameters, shared by the daemon and the clients."""

from __future__ import annotations

from typing import Any

from ipc.protocol import (
    E_BAD_FIELD,
    MAX_MESSAGES,
    MAX_STOP,
    MAX_TOKENS_LIMIT,
    ProtocolError,
    field,
    number,
)

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_TOKENS = 256


def parse_chat(msg: dict[str, Any]) -> dict[str, Any]:
    """Return the normalised generation parameters of a ``chat`` message."""
    messages = field(msg, "messages", list)
    if not messages or len(messages) > MAX_MESSAGES:
        raise ProtocolError(E_BAD_FIELD, f"'messages' must hold 1..{MAX_MESSAGES} messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ProtocolError(E_BAD_FIELD, f"messages[{i}] must be a map")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ProtocolError(E_BAD_FIELD, f"messages[{i}].role must be one of {ROLES}")
        if not isinstance(content, str):
            raise ProtocolError(E_BAD_FIELD, f"messages[{i}].content must be a string")
        clean.append({"role": role, "content": content})
    stop = field(msg, "stop", (str, list), [])
    if isinstance(stop, str):
        stop = [stop]
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ProtocolError(E_BAD_FIELD, f"'stop' must be up to {MAX_STOP} non-empty strings")
    seed = number(msg, "seed", 0, 2**63 - 1, None, integer=True)
    agent = field(msg, "agent", str, "")
    session = field(msg, "session", str, "")
    if len(agent) > 128 or len(session) > 128:
        raise ProtocolError(E_BAD_FIELD, "'agent' and 'session' are at most 128 characters")
    return {
        "messages": clean,
        "max_tokens": number(msg, "max_tokens", 1, MAX_TOKENS_LIMIT, DEFAULT_MAX_TOKENS, integer=True),
        "temperature": float(number(msg, "temperature", 0.0, 100.0, 0.0)),
        "top_p": float(number(msg, "top_p", 1e-6, 1.0, 1.0)),
        "seed": seed,
        "stop": stop,
        "agent": agent,
        "session": session,
        "stream": bool(field(msg, "stream", bool, True)),
    }
