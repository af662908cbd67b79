"""Configuration of ``quantad serve``: TOML file, environment and flags, derived from the argparse parser.

Every long ``--some-flag`` of the ``serve`` parser is also the TOML key ``some_flag`` and the
environment variable ``QUANTAD_SOME_FLAG``, parsed and checked with the flag's own type and
choices.  Nothing here lists options by name, so a flag added to the parser is configurable
everywhere at once.  Precedence: flag > environment > file > default.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import tomllib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_FILE = Path("/etc/quantad/quantad.toml")
ENV_PREFIX = "QUANTAD_"
NOT_KEYS = {"help", "config"}  # flags that are not settings
DEFAULT_QUANTUM_MS = 100.0  # a quantum when neither --quantum-ms nor --quantum-tokens is set
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class ConfigError(Exception):
    """One or more bad settings; each line names the key and where it was set."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class Effective:
    """The resolved options, and where each came from: default, flag, env:VAR or file:PATH:LINE."""

    values: argparse.Namespace
    sources: dict[str, str] = field(default_factory=dict)
    file: Path | None = None

    def changed_from(self, old: Effective) -> dict[str, tuple[Any, Any]]:
        mine, theirs = vars(self.values), vars(old.values)
        return {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}

    def with_live(self, new: Effective, live: Collection[str]) -> tuple[Effective, dict[str, tuple[Any, Any]]]:
        """What a reload (SIGHUP) applies: ``new``'s values of the ``live`` keys over these; and every change found.

        A changed key that is not live keeps its old value and source until a restart.
        """
        changes = new.changed_from(self)
        kept, sources = dict(vars(self.values)), dict(self.sources)
        for key, (_, after) in changes.items():
            if key in live:
                kept[key], sources[key] = after, new.sources.get(key, "?")
        return Effective(argparse.Namespace(**kept), sources, new.file), changes


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's settings by key (the dest of each long flag)."""
    out = {}
    for action in parser._actions:  # argparse has no public accessor for its actions
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.dest not in NOT_KEYS and action.dest is not argparse.SUPPRESS:
            out[action.dest] = action
    return out


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def config_path(explicit: str | None) -> Path | None:
    """``--config``, else ``$QUANTAD_CONFIG``, else /etc/quantad/quantad.toml when it exists."""
    if explicit or os.environ.get(ENV_PREFIX + "CONFIG"):
        return Path(explicit or os.environ[ENV_PREFIX + "CONFIG"])
    return DEFAULT_FILE if DEFAULT_FILE.is_file() else None


def key_line(text: str, key: str) -> int | None:
    """tomllib reports no positions: find the line that assigns ``key``."""
    pattern = re.compile(rf"""^\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')\s*=""")
    for n, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return n
    return None


def convert(action: argparse.Action, value: Any, where: str) -> Any:
    """Parse one value as the flag would, or raise ValueError with a message naming ``where``."""
    key = action.dest
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
            value = value.strip().lower() in TRUE
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {key}: expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_one(action, v, where) for v in items]
    if isinstance(value, list | dict):
        raise ValueError(f"{where}: {key}: expected a single value, got {type(value).__name__}")
    return _one(action, value, where)


def _one(action: argparse.Action, value: Any, where: str) -> Any:
    key = action.dest
    if isinstance(value, bool) or (action.type is None and not isinstance(value, str)):
        raise ValueError(f"{where}: {key}: expected a string, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {key}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ValueError(f"{where}: {key}: {value!r} is not one of {choices}")
    return value


def default_of(action: argparse.Action) -> Any:
    """The default as argparse would apply it (string defaults go through ``type``)."""
    if isinstance(action.default, str) and action.type is not None:
        return action.type(action.default)
    return action.default


def read_file(path: Path, opts: dict[str, argparse.Action]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Values and sources from the TOML file, and every problem found in it."""
    try:
        text = path.read_text()
    except OSError as exc:
        return {}, {}, [f"{path}: cannot read: {exc.strerror or exc}"]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return {}, {}, [f"{path}: invalid TOML: {exc}"]
    values, sources, problems = {}, {}, []
    for key, raw in data.items():
        line = key_line(text, key)
        where = f"{path}:{line}" if line else str(path)
        if key not in opts:
            near = difflib.get_close_matches(key.replace("-", "_"), list(opts), n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(f"{where}: unknown key {key!r}{hint}")
            continue
        try:
            values[key] = convert(opts[key], raw, where)
            sources[key] = f"file:{where}"
        except ValueError as exc:
            problems.append(str(exc))
    return values, sources, problems


def resolve(parser: argparse.ArgumentParser, given: argparse.Namespace, path: Path | None) -> Effective:
    """Merge defaults, the file, the environment and the flags in ``given`` (only flags actually passed)."""
    opts = options(parser)
    file_values, file_sources, problems = read_file(path, opts) if path else ({}, {}, [])
    values, sources = {}, {}
    for key, action in opts.items():
        var = env_name(key)
        if key in vars(given):
            values[key], sources[key] = getattr(given, key), "flag"
        elif os.environ.get(var) is not None:
            try:
                values[key], sources[key] = convert(action, os.environ[var], f"${var}"), f"env:{var}"
            except ValueError as exc:
                problems.append(str(exc))
        elif key in file_values:
            values[key], sources[key] = file_values[key], file_sources[key]
        else:
            values[key], sources[key] = default_of(action), "default"
    if problems:
        raise ConfigError(problems)
    return Effective(argparse.Namespace(**values), sources, path)


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with every default suppressed: what remains was given on the command line."""
    saved = {a: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        return parser.parse_args(argv)
    finally:
        for a, d in saved.items():
            a.default = d


def show(eff: Effective, as_json: bool = False) -> str:
    """``quantad config show``: every effective value and its source."""
    import json

    derived = derived_defaults(vars(eff.values))
    rows = {}
    for k, v in sorted(vars(eff.values).items()):
        if v is None and k in derived:  # what the daemon will use, not a bare "unset"
            rows[k] = {"value": _plain(derived[k]), "source": "default (derived)"}
        else:
            rows[k] = {"value": _plain(v), "source": eff.sources[k]}
    if as_json:
        return json.dumps({"file": str(eff.file) if eff.file else None, "options": rows}, indent=2)
    width = max(map(len, rows), default=0)
    head = f"# config file: {eff.file or 'none'}"
    return "\n".join([head] + [f"{k.ljust(width)} = {_toml(r['value'])}  # {r['source']}" for k, r in rows.items()])


def derived_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """The values options left unset take at start (what ``launch`` derives), for ``config show``."""
    from ipc.endpoints import agent_endpoint, state_dir, worker_endpoint
    from scheduler.limits import Limits

    lim = Limits()
    endpoint = values.get("endpoint") or agent_endpoint(None, client=False)
    out: dict[str, Any] = {
        "endpoint": endpoint,
        "worker_endpoint": worker_endpoint(endpoint),
        "state_dir": str(state_dir()),
        "requests_per_identity": lim.requests_per_identity,
        "tokens_per_identity": lim.tokens_per_identity,
        "rate_limit": lim.messages_per_s,
        "rate_burst": lim.burst,
        "max_unread": lim.max_unread,
        "max_connections": lim.max_connections,
    }
    if values.get("backend") != "openai":
        out["model"] = "smollm2"
    if not values.get("quantum_tokens"):
        out["quantum_ms"] = DEFAULT_QUANTUM_MS
    return out


def _plain(v: Any) -> Any:
    return v if v is None or isinstance(v, bool | int | float | str | list) else str(v)


def _toml(v: Any) -> str:
    import json

    if v is None:
        return "(unset)"
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)
