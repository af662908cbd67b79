"""A streamed answer with tools, split into what is content and what are tool calls, as it grows.

Local models write a call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(the Hermes/Qwen form). Agents must never see that markup: the text outside it is content,
and each call streams as OpenAI's deltas, its name first, then its arguments as they come.
``split`` is a pure function of the text so far, so the daemon can tell any follower, from
any offset (a reconnect, an ``attach``), what it has not seen yet by comparing two splits;
everything it returns only grows as the text does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass
class Call:
    block: int  # which ``<tool_call>`` block of the text (the worker's call ids count blocks)
    name: str
    arguments: str  # its arguments' JSON text so far


@dataclass
class Split:
    content: str = ""
    calls: list[Call] = field(default_factory=list)


def _held(tail: str, tag: str) -> int:
    """How many characters at the end of ``tail`` could be the start of ``tag``."""
    for k in range(min(len(tail), len(tag) - 1), 0, -1):
        if tail.endswith(tag[:k]):
            return k
    return 0


def _call(block: int, inner: str, closed: bool, names: set[str]) -> Call | None:
    head = _HEAD.match(inner)
    if head is None:
        return None
    try:
        name = json.loads(f'"{head.group(1)}"')
    except json.JSONDecodeError:
        return None
    if name not in names:
        return None  # the worker's parse drops a call of a function it was not given
    args = inner[head.end() :].rstrip()
    if closed:
        args = args[:-1].rstrip() if args.endswith("}") else args  # the call object's own closing brace
    else:  # a closing tag may be starting; a brace may be the arguments' or the call's: not yet known
        args = args[: len(args) - _held(args, TOOL_CLOSE)].rstrip("} \n\t")
    return Call(block, name, args)


def split(text: str, names: set[str], final: bool = False) -> Split:
    """Content and calls of ``text``; unless ``final``, a possible tag start at the end is held back."""
    out, pos, block = Split(), 0, 0
    while True:
        i = text.find(TOOL_OPEN, pos)
        if i < 0:
            tail = text[pos:]
            out.content += tail if final else tail[: len(tail) - _held(tail, TOOL_OPEN)]
            return out
        out.content += text[pos:i]
        j = text.find(TOOL_CLOSE, i + len(TOOL_OPEN))
        inner = text[i + len(TOOL_OPEN) : j if j >= 0 else len(text)]
        call = _call(block, inner, j >= 0, names)
        if call is not None:
            out.calls.append(call)
        block += 1
        if j < 0:
            return out
        pos = j + len(TOOL_CLOSE)


def deltas(old: Split, new: Split, pid: int) -> list[dict]:
    """OpenAI ``tool_calls`` deltas taking a follower from ``old`` to ``new``: a call's id and name once, then text."""
    out = []
    for index, call in enumerate(new.calls):
        seen = old.calls[index].arguments if index < len(old.calls) else None
        if seen is None:
            out.append({"index": index, "id": f"call_{pid}_{call.block}", "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments}})  # fmt: skip
        elif len(call.arguments) > len(seen):
            out.append({"index": index, "function": {"arguments": call.arguments[len(seen) :]}})
    return out
