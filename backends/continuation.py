"""Text-based context switching: what a preempted API request keeps, and how it goes on.

A remote server holds no state we can save, so a request's context is the text (and tool
call deltas) streamed so far.  Resuming asks the server to go on from that text, by one of:

- ``prefix``: chat completions with the partial assistant message appended and
  ``continue_final_message`` (vLLM, SGLang and others);
- ``completions``: ``/v1/completions`` on the chat template rendered here by the model's
  tokenizer, followed by the partial text (``transformers serve`` and any server with a
  raw completions endpoint);
- ``none``: neither; the request is not preemptible.  If it must restart anyway (its worker
  died), it is replayed from the start and the text already streamed is checked and skipped.

Nothing here does I/O: the API engine (``backends.openai_engine``) drives the streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backends.api_logprobs import request_fields
from ipc.chat_params import ChatParams

PREFIX = "prefix"
COMPLETIONS = "completions"
NONE = "none"
METHODS = (PREFIX, COMPLETIONS, NONE)

# Parameters the completions endpoint cannot carry: sent on chat streams only.
CHAT_ONLY = ("tools", "tool_choice", "response_format", "parallel_tool_calls", "reasoning_effort")
OPENAI_CONTROLS = ("frequency_penalty", "presence_penalty", "logit_bias")  # OpenAI's own parameters
# vLLM's and llama.cpp's, sent in the body
EXTRA_CONTROLS = ("top_k", "min_p", "repetition_penalty", "ignore_eos", "chat_template_kwargs")
JSON_FORMATS = ("json_object", "json_schema")


@dataclass
class Attempt:
    """One HTTP stream of a request: what the server had to read before generating."""

    prompt_tokens: int | None  # known (usage or local tokenizer), else estimated at the end
    prefix_tokens: int  # generated tokens re-sent inside the prompt (0 for a fresh start)


@dataclass
class TextContext:
    """A request's text snapshot: enough to continue it on any worker of the same endpoint."""

    rid: int
    params: ChatParams  # a map is read into the record
    text: str = ""  # everything generated and read so far (released + held back)
    released: int = 0  # characters of ``text`` already sent to the daemon
    generated: int = 0  # completion tokens counted so far, over all attempts
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    resumes: int = 0
    method: str | None = None  # how the last resume was done
    switch_s: float = 0.0
    resume_wait_s: float = 0.0  # time to the first new text of resumed attempts
    replay: str = ""  # text to regenerate and check before anything new is shown (method none)

    def __post_init__(self) -> None:
        self.params = ChatParams.of(self.params)

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def remaining(self) -> int:
        return self.max_tokens - self.generated

    @property
    def completion(self) -> bool:
        """A plain completion (``prompt``), not a chat: it goes on by appending its text to the prompt."""
        return self.params.prompt is not None

    @property
    def nbytes(self) -> int:
        return len(self.text.encode()) + sum(len(str(t).encode()) for t in self.tool_calls.values())

    def continuable_by(self, method: str) -> bool:
        """Whether this request may be switched out and resumed by ``method``.

        Not with a half-streamed tool call (no API continues one), nor with a server-side
        JSON grammar: servers (vLLM, llama.cpp) start the grammar at the first generated
        token of each stream, so a continuation would open a second JSON value after the
        partial one.  ``completions`` cannot carry tools at all.
        """
        if self.completion:  # any /v1/completions endpoint continues prompt + text; token ids need no text yet
            return isinstance(self.params.prompt, str)
        if method == NONE or self.tool_calls:
            return False
        if (self.params.response_format or {}).get("type") in JSON_FORMATS:
            return False
        return method == PREFIX or not (self.params.tools or self.params.tool_choice)

    # ---- streamed text ------------------------------------------------------------------
    def add_text(self, delta: str) -> str:
        """Take a streamed delta; return the part that is new (not a replay of shown text)."""
        if self.replay:
            n = min(len(delta), len(self.replay))
            if delta[:n] != self.replay[:n]:
                raise ReplayDiverged("the restarted stream does not repeat the text already streamed")
            self.replay, delta = self.replay[n:], delta[n:]
        self.text += delta
        return delta

    def release(self, stops: list[str]) -> tuple[str, bool]:
        """Text now safe to show, and whether a stop string ended the turn.

        The server enforces ``stop`` too, but a stop string can straddle a resume point,
        where the server sees only its second half: check here, holding back a tail that
        may be the start of a stop string.
        """
        longest = max((len(s) for s in stops), default=0)
        start = max(0, self.released - longest + 1)
        hits = [i for s in stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: max(min(hits), self.released)]
            end, stopped = len(self.text), True
        else:
            held = max((k for s in stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end, stopped = max(len(self.text) - held, self.released), False
        out, self.released = self.text[self.released : end], end
        return out, stopped

    def flush(self) -> str:
        out, self.released = self.text[self.released :], len(self.text)
        return out

    def add_tool_deltas(self, deltas: list[Any]) -> None:
        """Merge streamed tool-call fragments (OpenAI ``delta.tool_calls``) by index."""
        for d in deltas:
            call = self.tool_calls.setdefault(
                d.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
            call["id"] = d.id or call["id"]
            call["type"] = d.type or call["type"]
            if d.function is not None:
                name = d.function.name or ""
                if name != call["function"]["name"]:  # llama.cpp repeats the whole name in every delta
                    call["function"]["name"] += name
                call["function"]["arguments"] += d.function.arguments or ""

    # ---- accounting ---------------------------------------------------------------------
    def prompt_stats(self, base: int | None) -> tuple[int, int, int]:
        """(prompt tokens of the chat, prompt tokens the server read in all, extra because of resumes).

        An interrupted stream never delivers its usage: attempts without a count are
        estimated as the chat's prompt plus the generated text they re-sent.
        """
        if base is None:
            known = [a for a in self.attempts if a.prompt_tokens is not None]
            base = known[-1].prompt_tokens - known[-1].prefix_tokens if known else 0
        computed = sum(
            a.prompt_tokens if a.prompt_tokens is not None else base + a.prefix_tokens for a in self.attempts
        )
        return base, computed, max(computed - base, 0)

    def migrate_state(self) -> dict[str, Any]:
        """Counters that travel with a migrating request (the daemon holds the text)."""
        return {
            "generated": self.generated,
            "resumes": self.resumes,
            "switch_s": self.switch_s,
            "attempts": [[a.prompt_tokens, a.prefix_tokens] for a in self.attempts],
            "tool_calls": list(self.tool_calls.values()),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.generated = int(state.get("generated", self.generated))
        self.resumes = int(state.get("resumes", 0))
        self.switch_s = float(state.get("switch_s", 0.0))
        self.attempts = [Attempt(p, int(n)) for p, n in state.get("attempts", [])]
        self.tool_calls = dict(enumerate(state.get("tool_calls", [])))


class ReplayDiverged(Exception):
    """A replayed request produced other text than what the agent already saw."""


class LocalTemplate:
    """The model's tokenizer, loaded here: renders chat templates and counts tokens."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer  # only workers given --tokenizer pay for this import

        self.tok = AutoTokenizer.from_pretrained(path)
        # A server tokenizing a completions prompt adds BOS itself; do not send a second one.
        bos = self.tok.bos_token
        ids = self.tok("x")["input_ids"]
        self.strip_bos = bos if bos and ids and ids[0] == self.tok.bos_token_id else ""

    def render(self, messages: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **(extra or {}))
        return text[len(self.strip_bos) :] if self.strip_bos and text.startswith(self.strip_bos) else text

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])


def request_for(ctx: TextContext, model: str, method: str | None, template: LocalTemplate | None) -> tuple[str, dict]:
    """The next stream of ``ctx``: (``"chat"`` or ``"completions"``, keyword arguments for the client).

    ``method`` is None for a fresh start or a replay, else how to continue ``ctx.text``.
    ``max_tokens`` is lowered by what was already generated.
    """
    p = ctx.params
    kw: dict[str, Any] = {
        "model": model,
        "max_tokens": ctx.remaining if method else ctx.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if p.seed is not None:
        kw["seed"] = p.seed
    if p.stop:
        kw["stop"] = list(p.stop)
    wire = p.wire()  # the controls by their OpenAI names, as the daemon kept them (neutral ones left out)
    kw |= {k: wire[k] for k in OPENAI_CONTROLS if wire.get(k)}
    extra = {k: wire[k] for k in EXTRA_CONTROLS if k in wire}
    if ctx.completion:
        prompt = p.prompt + ctx.text if method and ctx.text else p.prompt
        return "completions", kw | {"prompt": prompt} | request_fields("completions", p) | _extra(extra)
    if method == COMPLETIONS:
        if template is None:
            raise ValueError("the completions method needs --tokenizer")
        legacy = request_fields("completions", p)
        prompt = template.render(p.messages, p.template_kwargs) + ctx.text
        return "completions", kw | {"prompt": prompt} | legacy | _extra(extra)
    messages = list(p.messages)
    kw |= {k: wire[k] for k in CHAT_ONLY if wire.get(k) is not None} | request_fields("chat", p)
    if method == PREFIX:
        messages.append({"role": "assistant", "content": ctx.text})
        extra |= {"continue_final_message": True, "add_generation_prompt": False}
    return "chat", kw | {"messages": messages} | _extra(extra)


def _extra(fields: dict[str, Any]) -> dict[str, Any]:
    """Body fields the OpenAI client has no argument for."""
    return {"extra_body": fields} if fields else {}
