"""One log line per event, as ``key=value`` pairs or JSON, journald-friendly.

Here in ``ipc`` (the floor) because the daemon and its workers share one log stream.  Messages
are written ``event=name key=value ...``; a free-text message becomes ``msg="..."``.  Under
journald (``$JOURNAL_STREAM`` names our stderr) lines carry no timestamp (the journal adds
one) and start with the ``<N>`` syslog priority of sd-daemon(3); a traceback stays on the
same line, escaped, so an event is never split across journal entries.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import sys
import time

FORMATS = ("kv", "json")
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
PAIR = re.compile(r"""\s*([A-Za-z_][\w.]*)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S*)""")


def under_journald(stream=None) -> bool:
    """True when ``$JOURNAL_STREAM`` (``DEV:INODE``) is the stream we write to (sd-daemon(3))."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def pairs(message: str) -> dict[str, object] | None:
    """``event=x pid=3 why='a b'`` as a dict, or None when the message is not all pairs."""
    out, pos = {}, 0
    while pos < len(message):
        m = PAIR.match(message, pos)
        if m is None or m.end() == pos:
            return None
        key, raw = m.group(1), m.group(2)
        out[key] = _value(raw)
        pos = m.end()
        while pos < len(message) and message[pos] == " ":
            pos += 1
    return out or None


def _value(raw: str) -> object:
    if raw[:1] in ("'", '"'):
        try:
            return ast.literal_eval(raw)  # our own %r output; literal_eval evaluates nothing
        except (ValueError, SyntaxError):
            return raw
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return {"None": None, "True": True, "False": False}.get(raw, raw)


class Formatter(logging.Formatter):
    def __init__(self, fmt: str = "kv", journald: bool = False, static: dict[str, str] | None = None):
        super().__init__()
        self.kind, self.journald, self.static = fmt, journald, static or {}

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        fields: dict[str, object] = {}
        if not self.journald:
            fields["ts"] = self._ts(record.created)
        fields["level"] = record.levelname.lower()
        fields.update(self.static)
        parsed = pairs(message)
        fields.update(parsed if parsed is not None else {"msg": message})
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.kind == "json":
            line = json.dumps(fields, default=str, ensure_ascii=False)
        else:
            line = " ".join(f"{k}={self._kv(k, v, parsed)}" for k, v in fields.items())
        if self.journald:
            line = f"<{PRIORITY.get(record.levelno, 6)}>{line}"
        return line

    @staticmethod
    def _ts(created: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"

    @staticmethod
    def _kv(key: str, value: object, parsed: dict | None) -> str:
        text = str(value)
        if key in ("msg", "exc") or (parsed and isinstance(value, str) and (not text or re.search(r"[\s\"'=]", text))):
            return json.dumps(text, ensure_ascii=False)  # one line, quoted, newlines escaped
        return text


def setup(level: str | int = "INFO", fmt: str | None = None, **static: str) -> None:
    """Configure the root logger on stderr; ``fmt`` defaults to ``$QUANTAD_LOG_FORMAT``, else kv."""
    fmt = fmt or os.environ.get("QUANTAD_LOG_FORMAT") or "kv"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Formatter(fmt if fmt in FORMATS else "kv", under_journald(sys.stderr), static))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    sys.excepthook = _log_uncaught  # a crash is one event too, not a multi-line traceback


def _log_uncaught(kind, value, tb) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("quantad").critical(
        "event=crash error=%r", f"{kind.__name__}: {value}", exc_info=(kind, value, tb)
    )
