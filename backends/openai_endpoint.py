"""One OpenAI-compatible endpoint: its client, its API key, its errors and what it can resume.

Capabilities are detected, not assumed: a one-token probe per method, once per worker,
cached.  Only a clear refusal (400, 404, 405, 422, 501) rules a method out; a server that is
down or overloaded leaves the answer unknown, and detection runs again before the next
request.  Accepting is not honouring: llama.cpp's Python server ignores unknown fields such
as ``continue_final_message``, so the prefix probe also compares prompt sizes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import openai

from backends.continuation import COMPLETIONS, NONE, PREFIX, LocalTemplate

log = logging.getLogger("quantad.api")

DUMMY_KEY = "quantad-no-key"  # local servers (transformers serve, vLLM) accept any key
REFUSED = (400, 404, 405, 422, 501)
RETRYABLE_STATUS = (408, 409, 425, 429)
# A continued prompt is the plain one plus the partial text ("O": one token, two at most).
# A server that ignored continue_final_message closed the message and opened a new one.
CONTINUED_SLACK = 2


def api_key(env: str | None, path: str | None) -> str:
    """The key from a file, else the named environment variable, else $OPENAI_API_KEY, else a dummy."""
    if path:
        return Path(path).read_text().strip()
    if env:
        if not os.environ.get(env):
            raise SystemExit(f"quantad-api-worker: environment variable {env} is not set")
        return os.environ[env]
    return os.environ.get("OPENAI_API_KEY") or DUMMY_KEY


class RemoteError(Exception):
    """A failed stream, with whether trying again may help."""

    def __init__(self, message: str, retryable: bool, status: int | None = None):
        super().__init__(message)
        self.message, self.retryable, self.status = message, retryable, status


def classify(exc: BaseException, timeout_s: float) -> RemoteError:
    """Turn a client or transport exception into a ``RemoteError`` naming the remote's status."""
    if isinstance(exc, RemoteError):
        return exc
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        body = str(exc.message)[:200]
        return RemoteError(f"remote answered {status}: {body}", status in RETRYABLE_STATUS or status >= 500, status)
    if isinstance(exc, openai.APITimeoutError) or "Timeout" in type(exc).__name__:
        return RemoteError(f"remote timed out (no data for {timeout_s:g} s)", True)
    if isinstance(exc, openai.APIConnectionError):
        return RemoteError(f"cannot reach the remote: {exc.__cause__ or exc}", True)
    if isinstance(exc, openai.APIError):  # an error event inside the stream
        return RemoteError(f"remote error in stream: {exc.message}"[:300], True)
    if isinstance(exc, OSError) or "httpx" in type(exc).__module__:  # transport broke mid-stream
        return RemoteError(f"remote stream broke: {type(exc).__name__}: {exc}", True)
    return RemoteError(f"{type(exc).__name__}: {exc}", False)


class Endpoint:
    """The client of one base URL and the resume method it supports."""

    def __init__(
        self,
        base_url: str,
        model: str,
        key: str,
        timeout_s: float,
        method: str = "auto",
        template: LocalTemplate | None = None,
    ):
        self.base_url, self.model, self.timeout_s = base_url, model, timeout_s
        timeout = openai.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)
        self.template = template
        self.method: str | None = None if method == "auto" else method  # None: not known yet
        self.schema_as_json_object = False  # JSON schemas go as {"type": "json_object", "schema": ...}
        self._lock = asyncio.Lock()

    async def open(self, kind: str, kw: dict[str, Any]):
        """Start a stream; the caller iterates it inside ``async with``."""
        if kind == "completions":
            return await self.client.completions.create(**kw)
        inline = inline_schema(kw.get("response_format"))
        if inline is None:
            return await self.client.chat.completions.create(**kw)
        if self.schema_as_json_object:
            return await self.client.chat.completions.create(**kw | {"response_format": inline})
        try:
            return await self.client.chat.completions.create(**kw)
        except openai.APIStatusError as exc:
            # llama-cpp-python (and Anyscale-style APIs) refuse "json_schema" but enforce a
            # schema given inline with "json_object": answered 422 or, by llama-cpp-python, 500.
            if exc.status_code not in (*REFUSED, 500) or "response_format" not in str(exc.message):
                raise
        stream = await self.client.chat.completions.create(**kw | {"response_format": inline})
        self.schema_as_json_object = True
        log.info("event=schema_form endpoint=%s form=json_object+schema", self.base_url)
        return stream

    async def resume_method(self) -> str | None:
        """The best resume method, detected once (None while the endpoint cannot tell)."""
        if self.method is None:
            async with self._lock:
                if self.method is None:
                    self.method = await self._detect()
                    if self.method is not None:
                        log.info("event=resume_method endpoint=%s method=%s", self.base_url, self.method)
        return self.method

    async def _detect(self) -> str | None:
        chat = [{"role": "user", "content": "Say OK."}]
        create = self.client.chat.completions.create
        prefix = await self._probe(
            create,
            messages=[*chat, {"role": "assistant", "content": "O"}],
            extra_body={"continue_final_message": True, "add_generation_prompt": False},
        )
        if prefix is None:
            return None
        if prefix is not False:
            plain = await self._probe(create, messages=chat)
            if plain is None:
                return None
            if plain is False or honours_prefix(prefix, plain):
                return PREFIX
            log.info("event=prefix_ignored endpoint=%s", self.base_url)
        if self.template is None:
            return NONE
        completions = await self._probe(self.client.completions.create, prompt=self.template.render(chat) + "O")
        return None if completions is None else COMPLETIONS if completions else NONE

    async def _probe(self, create, **kw: Any) -> Any:
        """The response: accepted; False: refused; None: no clear answer (down, overloaded, timed out)."""
        try:
            return await create(model=self.model, max_tokens=1, temperature=0.0, **kw)
        except openai.APIStatusError as exc:
            if exc.status_code in REFUSED:
                return False
            log.warning("event=probe_failed endpoint=%s status=%s", self.base_url, exc.status_code)
        except (openai.APIError, OSError) as exc:
            log.warning("event=probe_failed endpoint=%s error=%s", self.base_url, type(exc).__name__)
        return None

    async def close(self) -> None:
        await self.client.close()


def honours_prefix(continued: Any, plain: Any) -> bool:
    """Whether the server continued the assistant message rather than answering it anew.

    Without ``usage`` there is nothing to compare: acceptance has to do.
    """
    a, b = getattr(continued, "usage", None), getattr(plain, "usage", None)
    if a is None or b is None:
        return True
    return a.prompt_tokens - b.prompt_tokens <= CONTINUED_SLACK


def inline_schema(response_format: Any) -> dict[str, Any] | None:
    """``{"type": "json_object", "schema": S}`` for a ``json_schema`` request, else None."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    return {"type": "json_object", "schema": (response_format.get("json_schema") or {}).get("schema", {})}
