"""``/tokenize`` and ``/detokenize`` in vLLM's shape, for the HTTP front: the daemon's ``tokenize`` ops behind them.

The daemon counts prompts with the workers' own tokenizer and chat template (``prompt_size``),
so what these return is what a chat's prompt costs and what its ``max_tokens`` must fit
beside (``max_model_len``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from http_front.errors import HttpError
from http_front.request import json_body, served
from ipc.client import AsyncClient, ClientError

PATHS = ("/tokenize", "/detokenize")


async def _body(request: web.Request, models: list[str]) -> dict[str, Any]:
    """A JSON object, naming a model served here if it names one (vLLM's routes take none too)."""
    body = await json_body(request)
    if "model" in body:
        served(body["model"], models)
    return body


def add_routes(app: web.Application, client: AsyncClient, models: list[str]) -> None:
    async def tokenize(request: web.Request) -> web.Response:
        body = await _body(request, models)
        keys = ("prompt", "messages", "add_special_tokens", "add_generation_prompt")
        fields = {k: body[k] for k in keys if k in body}
        if "messages" in fields and "add_special_tokens" not in fields:
            fields["add_special_tokens"] = False  # vLLM's default for chats: the template holds them
        try:
            out = await client.call("tokenize", None, **fields)  # before the first worker: answered once it is up
        except ClientError as exc:
            raise HttpError.of(exc.code, exc.message) from None
        return web.json_response({**out, "token_strs": None})

    async def detokenize(request: web.Request) -> web.Response:
        body = await _body(request, models)
        try:
            text = await client.detokenize(body.get("tokens"))
        except ClientError as exc:
            raise HttpError.of(exc.code, exc.message) from None
        except TypeError:
            raise HttpError(400, "'tokens' must be a list of token ids", param="tokens") from None
        return web.json_response({"prompt": text})

    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
