"""A chat's prompt length in tokens, counted in the daemon exactly as its workers will count it.

Local workers report, in their ``ready``, the longest context they take and the directory of
their tokenizer.  The daemon renders a chat with the model's own chat template (transformers'
``render_jinja_template``, the function ``apply_chat_template`` uses; it needs no torch) and
counts it with the ``tokenizers`` library, so that a prompt that cannot fit is refused with
``context_length_exceeded`` before any worker sees it.  Both libraries load on the first
``ready`` that names a tokenizer; without one, and for chats with tools (which the worker
writes into the prompt its own way), the workers' own check stands.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ipc import protocol as P

log = logging.getLogger("quantad")


class PromptSizer:
    def __init__(self, expected: int = 0) -> None:
        self.limit = 0  # the smallest context a worker reported (0: none reported)
        self.expected = expected  # what the model's files say they will report (``scheduler.model_card``)
        self.source = ""
        self._tokenizer: Any = None
        self._template: str | None = None
        self._special: dict[str, str] = {}
        self._longest = 1

    @property
    def known_limit(self) -> int:
        """The context length to show: the workers' once reported, the model files' until then (0: unknown)."""
        return self.limit or self.expected

    def learn(self, max_context: int, tokenizer_dir: str) -> None:
        """A worker's ``ready``: its context length and tokenizer (the same model everywhere)."""
        if max_context > 0:
            self.limit = min(self.limit, max_context) if self.limit else max_context
        if tokenizer_dir and tokenizer_dir != self.source:
            try:
                self._load(Path(tokenizer_dir))
                self.source = tokenizer_dir
            except Exception as exc:  # a tokenizer we cannot read here: the workers still check
                log.warning("event=prompt_size_off dir=%s why=%r", tokenizer_dir, str(exc)[:200])

    def _load(self, d: Path) -> None:
        from tokenizers import Tokenizer

        config = json.loads((d / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if template is None and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        if not isinstance(template, str):
            raise ValueError("no chat template")
        self._tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        self._longest = max(len(t.encode()) for t in self._tokenizer.get_vocab())  # bytes of the longest token
        self._template = template
        self._special = {
            k: (v["content"] if isinstance(v, dict) else v)
            for k, v in config.items()
            if k.endswith("_token") and isinstance(v, (str, dict))
        }

    def _known(self) -> Any:
        if self._tokenizer is None:
            raise P.ProtocolError(P.E_NOT_FOUND, "no tokenizer is known here yet (no local worker has reported one)")
        return self._tokenizer

    def encode(self, text: str, special: bool = True) -> list[int]:
        """``text``'s token ids, as the worker's tokenizer gives them."""
        return self._known().encode(text, add_special_tokens=special).ids

    def encode_chat(self, messages: list[dict], generation_prompt: bool = True) -> list[int]:
        """A chat's token ids, rendered with the model's template as a worker renders a plain chat."""
        self._known()
        plain = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
        try:
            text = self._render(plain, None, generation_prompt)
        except Exception as exc:  # the template's own errors (a role it refuses): the caller's input
            raise P.ProtocolError(P.E_BAD_FIELD, f"the chat template cannot render these messages: {exc}") from None
        return self.encode(text, special=False)

    def _render(self, messages: list[dict], tools: list[dict] | None, generation_prompt: bool = True) -> str:
        """A chat as the model's template writes it (what ``apply_chat_template`` renders, without torch)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=self._template,
            add_generation_prompt=generation_prompt,
            **self._special,
        )
        return rendered[0]

    def decode(self, ids: list[int]) -> str:
        tok = self._known()
        vocab = tok.get_vocab_size()
        if any(not 0 <= t < vocab for t in ids):
            raise P.ProtocolError(P.E_BAD_FIELD, f"'tokens' must be ids in [0, {vocab})")
        return tok.decode(ids, skip_special_tokens=False)

    def count(self, messages: list[dict], tools: list[dict] | None = None) -> int | None:
        """Prompt tokens with the generation prompt, as the workers render it; None when unknown."""
        if self._tokenizer is None:
            return None
        text = self._render(messages, tools)
        floor = len(text.encode()) // self._longest  # no tokenization can make fewer tokens
        if self.limit and floor > self.limit:
            return floor  # far too long: not worth the tokenizer's time (a 4 MB prompt would hold the loop)
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def _prompt_length(self, prompt: str | list[int]) -> int | None:
        """A completion's prompt: its ids, or its text tokenized as is (no template); None without a tokenizer."""
        if isinstance(prompt, list):
            return len(prompt)
        return len(self.encode(prompt)) if self._tokenizer is not None else None

    def check(
        self, messages: list[dict], tools: list[dict] | None, max_tokens: int | None, prompt: Any = None
    ) -> int | None:
        """The prompt's length, or ``context_length_exceeded`` when it and ``max_tokens`` do not fit."""
        if tools or any(m.get("tool_calls") for m in messages):
            return None  # the worker rewrites tools and tool calls into the prompt its own way: its check decides
        plain = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]  # as the worker does
        try:
            if not self.limit:
                n = None
            else:  # a completion's prompt has no template
                n = self._prompt_length(prompt) if prompt is not None else self.count(plain, None)
        except Exception as exc:  # a chat the template cannot take here: the worker decides, as before
            log.info("event=prompt_size_skipped why=%r", str(exc)[:200])
            return None
        if n is None:
            return None
        if n + (max_tokens or 0) > self.limit:
            ask = (
                f"{n} prompt tokens (at least)"
                if n > self.limit
                else f"{n} prompt tokens" + (f" + max_tokens {max_tokens}" if max_tokens else "")
            )
            raise P.ProtocolError(P.E_CONTEXT_LENGTH, f"{ask} do not fit: the model's context holds {self.limit}")
        return n
