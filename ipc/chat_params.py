"""Validation of a chat syscall's parameters, shared by the daemon and the clients."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ipc.protocol import (
    E_BAD_FIELD,
    E_UNSUPPORTED,
    MAX_MESSAGES,
    MAX_STOP,
    MAX_TOKENS_LIMIT,
    NICE_MAX,
    NICE_MIN,
    ProtocolError,
    field,
    number,
)

ROLES = ("system", "user", "assistant", "tool")
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_PROMPT_IDS = 1 << 17  # a prompt given as token ids
DEFAULT_MAX_TOKENS = 256
MAX_TEMPLATE_KWARGS = 32
# ``apply_chat_template``'s own arguments: a ``chat_template_kwargs`` key may not take their place
TEMPLATE_RESERVED = frozenset(
    "conversation messages tools documents chat_template add_generation_prompt continue_final_message tokenize"
    " padding truncation max_length return_tensors return_dict return_assistant_tokens_mask tokenizer_kwargs".split()
)
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")  # OpenAI's values


@dataclass(frozen=True, slots=True)
class ChatParams(Mapping[str, Any]):
    """A chat's generation parameters, checked once (``parse_chat``) and read as attributes after.

    ``wire()`` is the map the daemon sends a worker and keeps in its journal: the fields a chat
    always has, and the others only where they differ from their defaults (``from_wire`` reads
    it back).  As a ``Mapping`` the record reads like that map (``params["max_tokens"]``).
    """

    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    prompt: str | list[int] | None = None  # a completion: the text (or ids) as it is, no chat template
    max_tokens: int = DEFAULT_MAX_TOKENS
    min_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    agent: str = ""
    session: str = ""
    fork: str = ""
    nice: int = 0
    stream: bool = True
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    logit_bias: dict[str, float] = dataclasses.field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    on_behalf_of: str | None = None  # the identity an admin (the HTTP front) submits for
    ignore_eos: bool = False  # vLLM's and llama-server's: end-of-sequence never chosen, so it runs to max_tokens
    chat_template_kwargs: dict[str, Any] | None = None  # more variables for the model's chat template
    reasoning_effort: str | None = None  # given to the chat template as ``reasoning_effort``, as vLLM does

    # the fields a chat's map always has; the others only where they differ from their defaults
    ALWAYS: ClassVar[frozenset[str]] = frozenset(
        "messages max_tokens min_tokens temperature top_p seed stop agent session nice stream".split()
    )

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> ChatParams:
        """The record of a map of parameters (already checked), or the record itself."""
        return params if isinstance(params, ChatParams) else cls.from_wire(params)

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> ChatParams:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in wire.items() if k in names and v is not None})

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name in self.ALWAYS or value != default or (f.name == "top_logprobs" and self.logprobs):
                out[f.name] = value
        return out

    @property
    def structured(self) -> bool:
        """Whether the output is held to a grammar or carries tool calls."""
        return bool(self.tools or self.response_format)

    @property
    def template_kwargs(self) -> dict[str, Any]:
        """What the chat template is given beyond the messages and tools."""
        effort = {"reasoning_effort": self.reasoning_effort} if self.reasoning_effort else {}
        return {**(self.chat_template_kwargs or {}), **effort}

    @property
    def calls_tools(self) -> bool:
        """Whether its text may hold tool calls (``tools`` given, ``tool_choice`` not ``none``)."""
        return bool(self.tools) and self.tool_choice != "none"

    def __getitem__(self, key: str) -> Any:
        return self.wire()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.wire())

    def __len__(self) -> int:
        return len(self.wire())


def parse_chat(msg: dict[str, Any]) -> ChatParams:
    """Return the normalised generation parameters of a ``chat`` message."""
    refuse_unsupported(msg)
    prompt = _prompt(msg)
    clean = [] if prompt is not None else parse_messages(field(msg, "messages", list))
    stop = field(msg, "stop", (str, list), [])
    if isinstance(stop, str):
        stop = [stop]
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ProtocolError(E_BAD_FIELD, f"'stop' must be up to {MAX_STOP} non-empty strings")
    seed = number(msg, "seed", 0, 2**63 - 1, None, integer=True)
    agent = field(msg, "agent", str, "")
    session = field(msg, "session", str, "")
    fork = field(msg, "fork", str, "")
    if len(agent) > 128 or len(session) > 128 or len(fork) > 128:
        raise ProtocolError(E_BAD_FIELD, "'agent', 'session' and 'fork' are at most 128 characters")
    max_tokens = number(msg, "max_tokens", 1, MAX_TOKENS_LIMIT, DEFAULT_MAX_TOKENS, integer=True)
    min_tokens = number(msg, "min_tokens", 0, MAX_TOKENS_LIMIT, 0, integer=True)
    if min_tokens > max_tokens:
        raise ProtocolError(E_BAD_FIELD, f"'min_tokens' ({min_tokens}) must not exceed 'max_tokens' ({max_tokens})")
    return ChatParams.from_wire(
        {
            "messages": clean,
            "max_tokens": max_tokens,
            "min_tokens": min_tokens,
            "temperature": float(number(msg, "temperature", 0.0, 100.0, 0.0)),
            "top_p": float(number(msg, "top_p", 1e-6, 1.0, 1.0)),
            "seed": seed,
            "stop": stop,
            "agent": agent,
            "session": session,
            "nice": number(msg, "nice", NICE_MIN, NICE_MAX, 0, integer=True),
            "stream": bool(field(msg, "stream", bool, True)),
            **_controls(msg),
            **_template(msg, prompt is not None),
            **_structured(msg),
            **_on_behalf(msg),
            **({} if prompt is None else {"prompt": prompt}),
            **({"fork": fork} if fork else {}),
        }
    )


def _prompt(msg: dict[str, Any]) -> str | list[int] | None:
    """A completion's ``prompt`` (a text, or token ids) instead of ``messages``: no chat template applied."""
    prompt = field(msg, "prompt", (str, list), None)
    if prompt is None:
        return None
    if msg.get("messages") is not None:
        raise ProtocolError(E_BAD_FIELD, "a chat has 'messages' or a 'prompt', not both")
    if msg.get("tools") is not None:
        raise ProtocolError(E_BAD_FIELD, "'tools' need 'messages' (a chat template), not a 'prompt'")
    if not prompt:
        raise ProtocolError(E_BAD_FIELD, "'prompt' must not be empty")
    if isinstance(prompt, list) and (len(prompt) > MAX_PROMPT_IDS or any(type(t) is not int or t < 0 for t in prompt)):
        raise ProtocolError(E_BAD_FIELD, f"'prompt' as token ids: up to {MAX_PROMPT_IDS} non-negative integers")
    return prompt


def parse_messages(messages: list) -> list[dict[str, Any]]:
    """A chat's ``messages``, checked and normalised (shared by ``chat`` and ``tokenize``)."""
    if not messages or len(messages) > MAX_MESSAGES:
        raise ProtocolError(E_BAD_FIELD, f"'messages' must hold 1..{MAX_MESSAGES} messages")
    return [_message(i, m) for i, m in enumerate(messages)]


def _controls(msg: dict[str, Any]) -> dict[str, Any]:
    """The sampling controls (vLLM's names and ranges); only those set differently from neutral are kept."""
    out: dict[str, Any] = {
        "frequency_penalty": float(number(msg, "frequency_penalty", -2.0, 2.0, 0.0)),
        "presence_penalty": float(number(msg, "presence_penalty", -2.0, 2.0, 0.0)),
        "repetition_penalty": float(number(msg, "repetition_penalty", 0.01, 10.0, 1.0)),
        "top_k": int(number(msg, "top_k", -1, 1 << 20, 0, integer=True)),
        "min_p": float(number(msg, "min_p", 0.0, 1.0, 0.0)),
        "logit_bias": _logit_bias(field(msg, "logit_bias", dict, {})),
    }
    if out["top_k"] == -1:  # vLLM's "off"
        out["top_k"] = 0
    neutral = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "top_k": 0, "min_p": 0.0}
    return {k: v for k, v in out.items() if v and v != neutral.get(k)} | _logprobs(msg)


def _template(msg: dict[str, Any], completion: bool) -> dict[str, Any]:
    """``ignore_eos``, and what the chat template is given: ``chat_template_kwargs``, ``reasoning_effort``."""
    out: dict[str, Any] = {"ignore_eos": True} if field(msg, "ignore_eos", bool, False) else {}
    kwargs = field(msg, "chat_template_kwargs", dict, None)
    effort = field(msg, "reasoning_effort", str, None)
    if (kwargs or effort) and completion:
        raise ProtocolError(E_BAD_FIELD, "'chat_template_kwargs' and 'reasoning_effort' need 'messages'")
    if kwargs:
        names = [k for k in kwargs if not isinstance(k, str) or not k.isidentifier() or k in TEMPLATE_RESERVED]
        if len(kwargs) > MAX_TEMPLATE_KWARGS or names:
            raise ProtocolError(
                E_BAD_FIELD,
                f"'chat_template_kwargs' maps up to {MAX_TEMPLATE_KWARGS} variable names "
                f"(not {sorted(TEMPLATE_RESERVED)}) to values",
            )
        out["chat_template_kwargs"] = kwargs
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise ProtocolError(E_BAD_FIELD, f"'reasoning_effort' must be one of {REASONING_EFFORTS}")
        out["reasoning_effort"] = effort
    return out


def _logprobs(msg: dict[str, Any]) -> dict[str, Any]:
    """``logprobs`` (bool) and ``top_logprobs`` (0..20, which needs ``logprobs``), as OpenAI has them."""
    wanted = bool(field(msg, "logprobs", bool, False))
    top = number(msg, "top_logprobs", 0, MAX_TOP_LOGPROBS, None, integer=True)
    if top is not None and not wanted:
        raise ProtocolError(E_BAD_FIELD, "'top_logprobs' needs 'logprobs': true")
    return {"logprobs": True, "top_logprobs": top or 0} if wanted else {}


def _logit_bias(bias: dict) -> dict[str, float]:
    """``{token id: -100..100}``; ids as decimal strings, as JSON has them (and msgpack maps keep)."""
    if len(bias) > MAX_LOGIT_BIAS:
        raise ProtocolError(E_BAD_FIELD, f"'logit_bias' holds at most {MAX_LOGIT_BIAS} tokens")
    out = {}
    for k, v in bias.items():
        token = int(k) if isinstance(k, str) and k.isdigit() else k if type(k) is int else -1
        if token < 0 or isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise ProtocolError(E_BAD_FIELD, "'logit_bias' maps token ids to numbers in [-100, 100]")
        out[str(token)] = float(v)
    return out


def refuse_unsupported(msg: dict[str, Any]) -> None:
    """OpenAI fields the daemon knows and cannot honour: refused by name, never dropped."""
    n = msg.get("n")
    if n is not None and n != 1:
        raise ProtocolError(E_UNSUPPORTED, "'n' other than 1 is not supported: send n chats of one 'fork' group")


def _on_behalf(msg: dict[str, Any]) -> dict[str, Any]:
    """``on_behalf_of``: the identity an admin (the HTTP front) submits for; the daemon checks who may."""
    who = field(msg, "on_behalf_of", str, None)
    if who is None:
        return {}
    if not 0 < len(who) <= 128:
        raise ProtocolError(E_BAD_FIELD, "'on_behalf_of' is 1..128 characters")
    return {"on_behalf_of": who}


def _message(i: int, m: Any) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise ProtocolError(E_BAD_FIELD, f"messages[{i}] must be a map")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise ProtocolError(E_BAD_FIELD, f"messages[{i}].role must be one of {ROLES}")
    calls = m.get("tool_calls")
    if calls is not None and (role != "assistant" or not isinstance(calls, list) or not all(map(_is_call, calls))):
        raise ProtocolError(E_BAD_FIELD, f"messages[{i}].tool_calls must be assistant function calls")
    if not isinstance(content, str) and not (content is None and calls):
        raise ProtocolError(E_BAD_FIELD, f"messages[{i}].content must be a string")
    out: dict[str, Any] = {"role": role, "content": content}
    if calls:
        out["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    return out


def _is_call(c: Any) -> bool:
    fn = c.get("function") if isinstance(c, dict) else None
    return isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments", ""), (str, dict))


def _get(value: Any, key: str) -> Any:
    """``value[key]`` when ``value`` is a map, else None (a string where a map belongs is bad input, not a crash)."""
    return value.get(key) if isinstance(value, dict) else None


def _structured(msg: dict[str, Any]) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``response_format``, OpenAI-shaped."""
    out: dict[str, Any] = {}
    tools = field(msg, "tools", list, None)
    if tools is not None:
        if not 0 < len(tools) <= MAX_TOOLS:
            raise ProtocolError(E_BAD_FIELD, f"'tools' must hold 1..{MAX_TOOLS} tools")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            named = isinstance(fn, dict) and isinstance(fn.get("name"), str)
            if not named or t.get("type", "function") != "function":
                raise ProtocolError(E_BAD_FIELD, f"tools[{i}] must be {{type: function, function: {{name, ...}}}}")
            if not isinstance(fn.get("parameters", {}), dict):
                raise ProtocolError(E_BAD_FIELD, f"tools[{i}].function.parameters must be a JSON schema map")
        out["tools"] = tools
    choice = msg.get("tool_choice")
    if choice is not None:
        named = isinstance(choice, dict) and isinstance(_get(choice.get("function"), "name"), str)
        if choice not in ("auto", "none", "required") and not named:
            raise ProtocolError(E_BAD_FIELD, "'tool_choice' must be auto, none, required or {function: {name}}")
        if (named or choice == "required") and tools is None:
            raise ProtocolError(E_BAD_FIELD, "'tool_choice' needs 'tools'")
        if named and choice["function"]["name"] not in {t["function"]["name"] for t in tools}:
            raise ProtocolError(E_BAD_FIELD, "'tool_choice' names a function that is not in 'tools'")
        out["tool_choice"] = choice
    fmt = field(msg, "response_format", dict, None)
    if fmt is not None:
        kind = fmt.get("type")
        schema = _get(fmt.get("json_schema"), "schema") if kind == "json_schema" else None
        if kind not in ("text", "json_object", "json_schema") or (kind == "json_schema") != isinstance(schema, dict):
            raise ProtocolError(E_BAD_FIELD, "'response_format' must be text, json_object or json_schema{schema}")
        out["response_format"] = fmt
    if field(msg, "parallel_tool_calls", bool, True) is False:
        out["parallel_tool_calls"] = False  # at most one call in the answer
    return out
