"""Logprobs from an OpenAI-compatible endpoint, in the one shape the daemon keeps.

Chat streams carry ``choice.logprobs.content`` (entries with ``token``, ``logprob``,
``bytes``, ``top_logprobs``); completions streams the legacy columns (``tokens``,
``token_logprobs``, ``top_logprobs`` as dicts).  Both become the chat shape, the one the
local engines send, so the daemon and the HTTP front need not know where a token came from.
"""

from __future__ import annotations

from typing import Any

from ipc.chat_params import ChatParams

TOP_LOGPROBS_MAX = 20


def request_fields(kind: str, params: ChatParams | dict[str, Any]) -> dict[str, Any]:
    """The client arguments that ask ``kind``'s endpoint for logprobs (none when not asked for)."""
    params = ChatParams.of(params)
    if not params.logprobs:
        return {}
    k = min(params.top_logprobs, TOP_LOGPROBS_MAX)
    if kind == "completions":
        return {"logprobs": max(k, 1)}  # the legacy field is the top-k size; 0 is not accepted everywhere
    return {"logprobs": True, "top_logprobs": k}


def entries(kind: str, choice: Any, k: int) -> list[dict[str, Any]]:
    """The logprob entries of one streamed choice, each with at most ``k`` alternatives."""
    lp = getattr(choice, "logprobs", None)
    if lp is None:
        return []
    if kind == "completions":
        return _legacy(lp, k)
    return [_entry(e, k) for e in (getattr(lp, "content", None) or [])]


def _entry(e: Any, k: int) -> dict[str, Any]:
    top = [_alt(t.token, t.logprob, getattr(t, "bytes", None)) for t in (getattr(e, "top_logprobs", None) or [])]
    return _alt(e.token, e.logprob, getattr(e, "bytes", None)) | {"top_logprobs": top[:k]}


def _legacy(lp: Any, k: int) -> list[dict[str, Any]]:
    tokens = list(getattr(lp, "tokens", None) or [])
    values = list(getattr(lp, "token_logprobs", None) or [])
    tops = list(getattr(lp, "top_logprobs", None) or [])
    out = []
    for i, token in enumerate(tokens):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        ranked = sorted(top.items(), key=lambda kv: -kv[1])[:k]
        value = values[i] if i < len(values) else None
        out.append(_alt(token, value, None) | {"top_logprobs": [_alt(t, v, None) for t, v in ranked]})
    return out


def _alt(token: str, logprob: float | None, raw: list[int] | None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(raw) if raw is not None else list(token.encode())}
