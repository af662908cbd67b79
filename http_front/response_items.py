"""A Responses API body to the protocol's chat, and a finished chat back to a response object.

Pure functions of the JSON they are given (``responses.py`` serves them).  ``input`` is a string
or a list of items: messages (their text parts joined), ``function_call`` items (an assistant
turn's tool calls) and ``function_call_output`` items (a tool's answer, to a call made before);
``instructions`` is the system message; function ``tools`` are flattened in the Responses API and
nested in chat; ``text.format`` is chat's ``response_format``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from http_front.chat_reply import content_of, tool_calls
from http_front.errors import HttpError
from http_front.request import LABELS, served
from ipc import events as E
from ipc import protocol as P

PASSED = frozenset("temperature top_p parallel_tool_calls".split())
ACCEPTED = (
    PASSED
    | LABELS
    | frozenset(
        "model input instructions tools tool_choice max_output_tokens text stream reasoning include truncation"
        " previous_response_id background".split()
    )
)
ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}


def bad(message: str, param: str) -> HttpError:
    return HttpError(400, message, code=P.E_BAD_FIELD, param=param)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be a boolean", name)
    return value


def chat_of(
    body: dict[str, Any], models: list[str], history: list[dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """A ``/v1/responses`` body after ``history`` (a previous response's items) -> (messages, chat params,
    this body's input items, each with an id); the daemon checks the values."""
    served(body.get("model"), models)
    unknown = sorted(set(body) - ACCEPTED)
    if unknown:
        raise HttpError(400, f"'{unknown[0]}' is not supported here", code=P.E_UNSUPPORTED, param=unknown[0])
    if body.get("truncation") not in (None, "disabled", "auto"):
        raise bad("'truncation' must be 'disabled' or 'auto'", "truncation")
    items = items_of(body.get("input"))
    messages = _input([*(history or []), *items])
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad("'instructions' must be a string", "instructions")
        messages.insert(0, {"role": "system", "content": instructions})
    params: dict[str, Any] = {k: body[k] for k in PASSED if k in body}
    params["max_tokens"] = body.get("max_output_tokens")
    params["agent"] = body.get("user") if isinstance(body.get("user"), str) else ""
    if body.get("tools"):
        params["tools"] = [_tool(i, t) for i, t in enumerate(_list(body["tools"], "tools"))]
    if body.get("tool_choice") is not None:
        params["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if fmt is not None:
        params["response_format"] = _format(fmt)
    effort = body.get("reasoning", {}).get("effort") if isinstance(body.get("reasoning"), dict) else None
    if effort is not None:
        params["reasoning_effort"] = effort
    return messages, params, items


def items_of(raw: Any) -> list[dict[str, Any]]:
    """``input`` as the API's items, each with an id: what ``input_items`` lists and a next turn builds on."""
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    items = []
    for i, item in enumerate(_list(raw, "input")):
        if not isinstance(item, dict):
            raise bad(f"input[{i}] must be an object", "input")
        item = dict(item)
        kind = item.setdefault("type", "message")
        if kind == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        if not isinstance(item.get("id"), str):
            item["id"] = new_id(ITEM_PREFIX.get(str(kind), "item"))
        items.append(item)
    return items


def _list(value: Any, name: str) -> list:
    if not isinstance(value, list):
        raise bad(f"'{name}' must be a list", name)
    return value


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (``input_text``, ``output_text``) joined."""
    if isinstance(content, str):
        return content
    parts = _list(content, "input")
    if not all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text") for p in parts):
        raise bad(f"{where}: only text parts are supported", "input")
    return "\n".join(str(p.get("text", "")) for p in parts)


def _input(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    calls: set[str] = set()
    for i, item in enumerate(_list(raw, "input")):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{where} must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") in ROLES:
            out.append({"role": ROLES[item["role"]], "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise bad(f"{where}: a function_call needs 'call_id' and 'name'", "input")
            fn = {"name": name, "arguments": item.get("arguments", "")}
            call = {"id": call_id, "type": "function", "function": fn}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)  # calls of one turn: one assistant message
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            calls.add(call_id)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if call_id not in calls:
                raise bad(f"{where}: no function_call with call_id {call_id!r} before it", "input")
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, where)
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind == "reasoning":
            continue  # a model's reasoning from a previous turn: not part of the prompt here
        else:
            raise HttpError(400, f"{where}: item type {kind!r} is not supported", code=P.E_UNSUPPORTED, param="input")
    if not out:
        raise bad("'input' holds no message", "input")
    return out


def _tool(i: int, t: Any) -> dict[str, Any]:
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("name"), str):
        raise bad(f"tools[{i}]: only function tools {{type: function, name, parameters}}", "tools")
    fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
    return {"type": "function", "function": fn}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice  # auto, none, required: the daemon checks it


def _format(fmt: Any) -> dict[str, Any]:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise bad("'text.format' must be text, json_object or json_schema", "text")


# ---- a finished chat as a response ----------------------------------------------------------
def message_item(text: str, item_id: str, status: str = "completed") -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part] if text else []}


def call_item(call: dict[str, Any], item_id: str, status: str = "completed") -> dict[str, Any]:
    fn = call.get("function") or {}
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.get("id", ""),
        "name": fn.get("name", ""),
        "arguments": fn.get("arguments", ""),
        "status": status,
    }


def usage_of(done: E.Done) -> dict[str, Any]:
    u = done.usage or {}
    prompt, out = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + out,
    }


def msg_id(rid: str) -> str:
    """A response's message item id: fixed by the response's, so every read of it agrees."""
    return "msg_" + rid.removeprefix("resp_")


def fc_id(rid: str, k: int) -> str:
    return f"fc_{rid.removeprefix('resp_')}_{k}"


def shell(rid: str, body: dict[str, Any], model: str, status: str) -> dict[str, Any]:
    """The response object around its output: what was asked, echoed as OpenAI does."""
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": [],
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": body.get("temperature", 0.0),
        "top_p": body.get("top_p", 1.0),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "text": body.get("text") or {"format": {"type": "text"}},
        "metadata": body.get("metadata") or {},
        "store": False,
        "background": False,
        "previous_response_id": body.get("previous_response_id"),
        "error": None,
        "incomplete_details": None,
        "usage": None,
    }


def final_text(final: E.Event) -> str:
    """The text a response's request ended with: its content (no call markup), or what it had when cut short."""
    return (content_of(final) if isinstance(final, E.Done) else getattr(final, "text", None)) or ""


def output_items(rid: str, final: E.Event) -> list[dict[str, Any]]:
    """What a response's request produced, as output items: its text (a message), then its function calls."""
    text = final_text(final)
    if isinstance(final, E.Done):
        items = [message_item(text, msg_id(rid))] if text or not final.tool_calls else []
        return items + [call_item(call, fc_id(rid, k)) for k, call in enumerate(tool_calls(final))]
    return [message_item(text, msg_id(rid), "incomplete")] if text else []


def finish(response: dict[str, Any], final: E.Event) -> dict[str, Any]:
    """``response`` as its request ended: output items, usage and status (completed, incomplete, failed, cancelled)."""
    out = response | {"output": output_items(response["id"], final)}
    if isinstance(final, E.Done):
        cut = final.finish_reason == "length"
        return out | {
            "status": "incomplete" if cut else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "usage": usage_of(final),
        }
    if isinstance(final, E.Cancelled):
        return out | {"status": "cancelled"}
    code, message = (final.code, final.message) if isinstance(final, E.Error) else (P.E_INTERNAL, "ended unexpectedly")
    return out | {"status": "failed", "error": {"code": code, "message": message}}


def stored_response(view: dict[str, Any]) -> dict[str, Any]:
    """A stored response (the daemon's ``response_get``) as the API shows it: as it ended, or as far as it got."""
    record = view["record"]
    if view.get("final") is not None:
        return finish(record, E.decode(view["final"]))
    live = view.get("live") or {}
    if not live.get("tokens"):
        return record | {"status": "queued" if view.get("background") else "in_progress"}
    out = record | {"status": "in_progress"}
    if live.get("text") and not record.get("tools"):  # with tools the raw text may hold call markup
        out["output"] = [message_item(live["text"], msg_id(record["id"]), "in_progress")]
    return out
