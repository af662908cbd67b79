"""OpenAI-shaped errors of the HTTP front: a protocol error code becomes an HTTP status and an error body."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from ipc import events as E
from ipc import protocol as P
from ipc.client import Event

# protocol error code -> (HTTP status, OpenAI error type)
ERRORS: dict[str, tuple[int, str]] = {
    P.E_BAD_FIELD: (400, "invalid_request_error"),
    P.E_BAD_FRAME: (400, "invalid_request_error"),
    P.E_DUPLICATE_ID: (400, "invalid_request_error"),
    P.E_TOO_LARGE: (413, "invalid_request_error"),
    P.E_CONTEXT_LENGTH: (400, "invalid_request_error"),
    P.E_UNSUPPORTED: (400, "invalid_request_error"),
    P.E_QUOTA: (429, "rate_limit_error"),
    P.E_RATE_LIMITED: (429, "rate_limit_error"),
    P.E_NOT_FOUND: (404, "not_found_error"),
    P.EV_CANCELLED: (409, "cancelled"),  # killed (`quantad kill`): not to be retried
    P.E_SHUTTING_DOWN: (503, "service_unavailable"),
    P.E_REMOTE: (502, "server_error"),
    P.E_WORKER_FAILED: (500, "server_error"),
    P.E_INVALID_OUTPUT: (500, "server_error"),
    P.E_INTERNAL: (500, "server_error"),
}
RETRYABLE = {P.E_SHUTTING_DOWN, P.E_REMOTE}  # the OpenAI client obeys x-should-retry
PARAM_NAMES = {"agent": "user"}  # protocol field -> the OpenAI parameter it came from


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry: bool = False,
        partial: str = "",
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.retry, self.partial = retry, partial

    @classmethod
    def of(cls, code: str, message: str, partial: str = "") -> HttpError:
        """From a protocol error code (or ``cancelled``), with the field it names as ``param``."""
        status, kind = ERRORS.get(code, (500, "server_error"))
        named = re.search(r"'(\w+)'", message)
        param = PARAM_NAMES.get(named.group(1), named.group(1)) if named and status == 400 else None
        return cls(status, message, kind, code, param, code in RETRYABLE, partial)

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        if self.partial:
            err["partial_text"] = self.partial  # what was generated before the end (shutting_down, killed)
        return {"error": err}

    def response(self) -> web.Response:
        headers = {"x-should-retry": "true" if self.retry else "false"}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return web.json_response(self.body(), status=self.status, headers=headers)


def error_of(ev: Event) -> HttpError:
    if isinstance(ev, E.Cancelled):
        return HttpError.of(P.EV_CANCELLED, f"the request was cancelled: {ev.message}", ev.text)
    if isinstance(ev, E.Error):
        return HttpError.of(ev.code, ev.message, ev.text)
    return HttpError.of(P.E_INTERNAL, f"unexpected {ev.event!r} event", ev.text)
