"""Tools and JSON for local models: prompts, constrained decoding, and parsing.

Constrained decoding uses llguidance (MIT; a Rust core with CPU masks in ~1.5 ms for a
49k vocabulary here, JSON Schema and Lark grammars, and a matcher whose state is rebuilt
by replaying accepted tokens).  The grammar state lives in the request's ``Sequence``, so
it is part of every context snapshot; after a migration or restart it is rebuilt by
replaying the tokens already generated.  Tool calls use the Hermes/Qwen form
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; for a chat template that
knows no tools, the tool list is given to the model in a system message.
"""

from __future__ import annotations

import json
import re
from typing import Any

import llguidance
import llguidance.hf
import torch

from backends import token_mask
from backends.json_close import Closers, JsonDepth, narrow
from ipc.chat_params import ChatParams
from ipc.tool_stream import TOOL_CLOSE, TOOL_OPEN, split

RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
_TOOL_RE = re.compile(re.escape(TOOL_OPEN) + r"\s*(\{.*?\})\s*" + re.escape(TOOL_CLOSE), re.DOTALL)


class Constraint:
    """The grammar a request's tokens must follow, and where in it the request stands."""

    def __init__(
        self, lltok: llguidance.LLTokenizer, grammar: str, closers: Closers | None = None, budget: int = 0
    ) -> None:
        self.matcher = llguidance.LLMatcher(lltok, grammar)
        if self.matcher.is_error():
            raise ValueError(f"bad grammar: {self.matcher.get_error()}")
        self._mask = token_mask.allocate(lltok.vocab_size)
        self.closers = closers  # a JSON output: closed before max_tokens cuts it (``backends.json_close``)
        self.budget = budget  # max_tokens
        self.depth = JsonDepth()
        self.accepted = 0
        self.closed_early = False  # the budget, not the model, chose some of its last tokens

    @property
    def closing(self) -> bool:
        return self.closers is not None and self.budget - self.accepted <= self.depth.to_close

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A masked copy of one row of logits (the snapshot keeps the raw ones); near the budget's end, closing."""
        token_mask.fill(self.matcher, self._mask)
        out = logits.reshape(1, -1).float().cpu().clone()
        token_mask.apply(out, self._mask)
        if self.closing:
            narrowed = narrow(out, self.closers, self.depth)
            return out if narrowed is None else narrowed
        return out

    def accept(self, token: int) -> None:
        """Take the chosen token (also when replaying a request's tokens, which rebuilds all of this)."""
        self.closed_early |= self.closing
        self.matcher.consume_token(token)
        self.accepted += 1
        if self.closers is not None and token < len(self.closers.pieces):
            self.depth.feed(self.closers.pieces[token])

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()

    def report(self) -> dict[str, bool]:
        """For the ``done`` event's stats: whether the output is whole, and whether the budget closed it."""
        return {"grammar_complete": self.done, "grammar_closed_early": self.closed_early}


class Structurer:
    """Per worker: the llguidance view of the tokenizer (built once, ~0.5 s)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lltok = llguidance.hf.from_tokenizer(tokenizer)
        self.template_knows_tools = "tools" in (tokenizer.chat_template or "")
        self._closers: Closers | None = None

    @property
    def closers(self) -> Closers:
        """Built on first use (~0.4 s: every token decoded once)."""
        if self._closers is None:
            self._closers = Closers(self.tokenizer)
        return self._closers

    def constraint(self, params: ChatParams, replay: list[int] = ()) -> Constraint | None:
        grammar = grammar_for(params)
        if grammar is None:
            return None
        json_out = (params.response_format or {}).get("type") in ("json_object", "json_schema")
        closers = self.closers if json_out and grammar_is_format(params) else None
        c = Constraint(self.lltok, grammar, closers, params.max_tokens)
        for t in replay:
            c.accept(t)
        return c

    def messages(self, params: ChatParams) -> tuple[list[dict], list[dict] | None]:
        """Messages (assistant tool calls as text) and the tools argument for the template."""
        msgs = [as_text_message(m) for m in params.messages]
        tools = params.tools or None
        if not tools or params.tool_choice == "none":
            return msgs, None
        if self.template_knows_tools:
            return msgs, tools
        return [{"role": "system", "content": tools_prompt(tools)}, *map(as_user_response, msgs)], None


def as_text_message(m: dict) -> dict:
    """An assistant turn that called tools becomes text in the form the model was asked for."""
    if m.get("role") == "assistant" and m.get("tool_calls"):
        calls = [
            TOOL_OPEN + json.dumps({"name": c["function"]["name"], "arguments": _args(c["function"])}) + TOOL_CLOSE
            for c in m["tool_calls"]
        ]
        return {"role": "assistant", "content": (m.get("content") or "") + "".join(calls)}
    return {"role": m["role"], "content": m.get("content") or ""}


def as_user_response(m: dict) -> dict:
    """A tool's result for a template that knows no tools: a user turn in ``<tool_response>`` tags (Hermes's form)."""
    if m.get("role") != "tool":
        return m
    return {"role": "user", "content": f"{RESPONSE_OPEN}\n{m.get('content') or ''}\n{RESPONSE_CLOSE}"}


def _args(function: dict) -> Any:
    args = function.get("arguments", {})
    try:
        return json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        return args


def tools_prompt(tools: list[dict]) -> str:
    specs = "\n".join(json.dumps(t.get("function", t)) for t in tools)
    return (
        "You can call functions. To call one, reply with exactly "
        f'{TOOL_OPEN}{{"name": <function name>, "arguments": <arguments object>}}{TOOL_CLOSE} '
        f"and nothing else. A function's result comes back in {RESPONSE_OPEN}...{RESPONSE_CLOSE}: "
        f"answer the user from it. Available functions:\n{specs}"
    )


def _call_schema(tools: list[dict], only: str | None) -> dict:
    variants = []
    for t in tools:
        fn = t.get("function", t)
        if only is None or fn["name"] == only:
            variants.append(
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": fn["name"]},
                        "arguments": closed(fn.get("parameters") or {"type": "object"}),
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas", "patternProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_ONES = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def closed(schema: Any) -> Any:
    """``schema`` with every object that names its properties closed to others, unless it says otherwise.

    JSON Schema allows unnamed properties by default, and a small model under such a grammar
    goes on adding keys (echoes of the schema's own words) until ``max_tokens``; OpenAI's
    strict mode and vLLM close them.  ``allOf`` members are left open (closing each would
    forbid the others' properties); what they contain is closed.
    """
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed(v) for k, v in out[key].items()}
    for key in (*_SCHEMA_LISTS, *_SCHEMA_ONES):
        if isinstance(out.get(key), (dict, list)):
            out[key] = closed(out[key])
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [_as_written(m, closed(m)) for m in out["allOf"]]
    says = {"additionalProperties", "patternProperties", "allOf"} & set(out)
    if isinstance(out.get("properties"), dict) and not says:
        out["additionalProperties"] = False
    return out


def _as_written(member: Any, inner: Any) -> Any:
    """An ``allOf`` member closed inside, but as open at its top as it was written."""
    if isinstance(member, dict) and isinstance(inner, dict) and "additionalProperties" not in member:
        inner.pop("additionalProperties", None)
    return inner


COMPACT = {"x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}


def _compact(schema: dict) -> dict:
    """JSON as OpenAI returns it: no free whitespace (a model must not pad forever)."""
    return {**COMPACT, **schema}


def grammar_for(params: ChatParams) -> str | None:
    """The grammar a request asks for, or None for free text."""
    tools, choice = params.tools, params.tool_choice
    if tools and (choice == "required" or isinstance(choice, dict)):
        only = choice["function"]["name"] if isinstance(choice, dict) else None
        schema = json.dumps(_compact(_call_schema(tools, only)))
        lark = f"start: {json.dumps(TOOL_OPEN)} call {json.dumps(TOOL_CLOSE)}\ncall: %json {schema}"
        return llguidance.LLMatcher.grammar_from_lark(lark)
    fmt = params.response_format or {}
    if fmt.get("type") == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(_compact({"type": "object"}))
    if fmt.get("type") == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(_compact(closed(fmt["json_schema"]["schema"])))
    return None


def grammar_is_format(params: ChatParams) -> bool:
    """Whether the grammar ``grammar_for`` gives is the response format's (not a forced tool call's)."""
    tools, choice = params.tools, params.tool_choice
    return not (tools and (choice == "required" or isinstance(choice, dict)))


def parse_tool_calls(text: str, tools: list[dict] | None, rid: int) -> tuple[str | None, list[dict]]:
    """Split generated text into content and OpenAI-shaped ``tool_calls``.

    The content is what ``ipc.tool_stream`` streamed (no markup, even of a call cut short), and a
    call's id counts the ``<tool_call>`` blocks before it, as the stream's deltas do.
    """
    if not tools:
        return text, []
    names = {t.get("function", t)["name"] for t in tools}
    calls = []
    for match in _TOOL_RE.finditer(text):
        i = text.count(TOOL_OPEN, 0, match.start())
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and call.get("name") in names:
            calls.append(
                {
                    "id": f"call_{rid}_{i}",
                    "type": "function",
                    "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))},
                }
            )
    content = split(text, names, final=True).content
    if not calls:
        return content, []
    return (content.strip() or None), calls
