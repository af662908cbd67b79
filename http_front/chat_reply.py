"""An OpenAI chat-completions body to the protocol's chat, and a finished chat back to OpenAI's shape.

Pure functions of the JSON they are given, shared by the server and the ``n`` choices.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

from http_front.errors import HttpError
from http_front.request import LABELS, served
from ipc import events as E
from ipc import protocol as P

# OpenAI's chat fields (and vLLM's extra ones) the protocol's ``chat`` takes as they are; any other
# field is refused by name (``unsupported_parameter``), never dropped
CHAT_FIELDS = frozenset(
    "temperature top_p seed stop tools tool_choice response_format nice session min_tokens n logprobs top_logprobs"
    " frequency_penalty presence_penalty logit_bias top_k min_p repetition_penalty parallel_tool_calls"
    " ignore_eos chat_template_kwargs reasoning_effort".split()
)
HTTP_ONLY = frozenset("model messages max_tokens max_completion_tokens stream stream_options".split()) | LABELS
CUT_GRAMMAR = "max_tokens cut the output before its grammar was complete: it is not valid JSON"


def chat_fields(body: dict[str, Any], models: Iterable[str]) -> tuple[list, dict[str, Any]]:
    """An OpenAI chat-completions body (a JSON object) -> (messages, chat params).  The daemon checks the values."""
    model = body.get("model")
    if not isinstance(model, str):
        raise HttpError(400, "'model' is required", param="model")
    served(model, models)
    unknown = sorted(set(body) - CHAT_FIELDS - HTTP_ONLY)
    if unknown:
        raise HttpError(400, f"'{unknown[0]}' is not supported here", code=P.E_UNSUPPORTED, param=unknown[0])
    if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
        raise HttpError(400, "'stream' must be a boolean", param="stream")
    user = body.get("user")
    params = {
        "max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
        "agent": user if user is not None else "",  # none: the program is the conversation (scheduler.programs)
        **{k: body[k] for k in CHAT_FIELDS if k in body},
    }
    return _messages(body.get("messages")), params


def _messages(raw: Any) -> list[dict[str, Any]]:
    """OpenAI message shapes the protocol has no word for: ``developer`` is ``system``; text parts are joined."""
    if not isinstance(raw, list):
        raise HttpError(400, "'messages' must be a list of messages", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise HttpError(400, f"messages[{i}] must be an object", param="messages")
        m = dict(m)
        if m.get("role") == "developer":
            m["role"] = "system"
        if isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts
            ):
                raise HttpError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            m["content"] = "\n".join(p["text"] for p in parts)
        out.append(m)
    return out


def tool_calls(done: E.Done) -> list[dict[str, Any]]:
    calls = []
    for c in done.tool_calls or []:
        fn = c.get("function") or {}
        args = fn.get("arguments", "")
        calls.append(
            {
                "id": c.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": fn.get("name", ""),
                    "arguments": args if isinstance(args, str) else json.dumps(args),
                },
            }
        )
    return calls


def content_of(done: E.Done) -> str | None:
    return done.content if done.tool_calls else done.text


def completion(meta: dict[str, Any], done: E.Done) -> dict[str, Any]:
    """A finished chat as OpenAI's ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": content_of(done)}
    calls = tool_calls(done)
    if calls:
        message["tool_calls"] = calls
    return {
        **meta,
        "object": "chat.completion",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": done.finish_reason,
                "logprobs": None if done.logprobs is None else {"content": done.logprobs, "refusal": None},
            }
        ],
        "usage": done.usage or {},
        "quantad": {
            "pid": done.pid,
            "stats": done.stats,
            **({"warning": CUT_GRAMMAR} if done.stats.get("grammar_complete") is False else {}),
        },
    }
