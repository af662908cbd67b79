"""Checking JSON that an endpoint returned against what the request asked for.

Some OpenAI-compatible servers accept ``response_format`` but do not enforce it
(``transformers serve`` 5.24 returns plain text); the daemon must not pass that off as JSON.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema


def json_problem(text: str, response_format: dict[str, Any] | None) -> str | None:
    """None when ``text`` satisfies ``response_format``; else what is wrong, in one line."""
    kind = (response_format or {}).get("type")
    if kind not in ("json_object", "json_schema"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"the endpoint returned invalid JSON ({exc.msg} at character {exc.pos})"
    if kind == "json_object":
        return None if isinstance(value, dict) else "the endpoint returned JSON that is not an object"
    schema = response_format["json_schema"]["schema"]
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return f"the endpoint's JSON does not match the schema: {exc.message}"
    except jsonschema.SchemaError as exc:
        return f"the requested schema is invalid: {exc.message}"
    return None
