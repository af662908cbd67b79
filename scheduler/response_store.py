"""Stored responses (OpenAI's Responses API ``store``): what was asked, its input, and how it ended, per identity.

The HTTP front builds response objects; the daemon keeps them, so a stored response is as
durable as the requests it ran: on the journal's SQLite database (one file, one commit with
the request it runs), or in memory under ``--no-journal``.  A row links its request by
``pid``; when that request ends, its terminal event is written into the row, so a response
outlives the journal's ``--journal-keep-s`` and a restart.  Reads are per identity: another
identity's response is as absent as an unknown or expired one.  Rows expire after ``keep_s``;
an identity holding ``max_per_identity`` rows loses its oldest finished one to a new one.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from ipc import events as E
from ipc import protocol as P
from scheduler.journal import kept, pack, unpack

log = logging.getLogger("quantad")

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    pid INTEGER,
    created_at REAL NOT NULL,
    background INTEGER NOT NULL DEFAULT 0,
    record BLOB NOT NULL,
    input BLOB NOT NULL,
    final BLOB
);
CREATE INDEX IF NOT EXISTS responses_pid ON responses (pid);
CREATE INDEX IF NOT EXISTS responses_owner ON responses (owner, created_at);
"""

DEFAULT_KEEP_S = 30 * 24 * 3600.0  # OpenAI keeps a stored response 30 days
DEFAULT_MAX_PER_IDENTITY = 10_000


@dataclass(frozen=True)
class Stored:
    """One stored response as the front reads it back: its record and input as it gave them, and its end."""

    id: str
    pid: int | None
    created_at: float
    background: bool
    record: dict[str, Any]
    input: list[Any]
    final: E.Event | None  # its request's terminal event; None while it runs

    def view(self) -> dict[str, Any]:
        final = None if self.final is None else self.final.encode()
        return {
            "id": self.id,
            "pid": self.pid,
            "created_at": self.created_at,
            "background": self.background,
            "record": self.record,
            "input": self.input,
            "final": final,
        }


class ResponseStore:
    def __init__(
        self,
        db: sqlite3.Connection | None,
        keep_s: float = DEFAULT_KEEP_S,
        max_per_identity: int = DEFAULT_MAX_PER_IDENTITY,
    ):
        self.db = db if db is not None else sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self.db.executescript(SCHEMA)
        self.keep_s, self.max_per_identity = keep_s, max_per_identity
        self.evicted = 0

    def put(self, rid: str, owner: str, pid: int, background: bool, record: dict, items: list) -> None:
        """A new response of ``owner``'s, run by request ``pid`` (committed before the request is acknowledged)."""
        with self.db:
            self.db.execute("BEGIN")
            taken = self.db.execute("SELECT owner FROM responses WHERE id = ?", (rid,)).fetchone()
            if taken is not None:
                raise P.ProtocolError(P.E_DUPLICATE_ID, f"response id {rid!r} is already stored")
            self._make_room(owner)
            self.db.execute(
                "INSERT INTO responses (id, owner, pid, created_at, background, record, input) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rid, owner, pid, time.time(), int(background), pack(record), pack(items)),
            )

    def _make_room(self, owner: str) -> None:
        """At the bound: the owner's oldest finished response goes; with none finished, the new one is refused."""
        held = self.db.execute("SELECT count(*) FROM responses WHERE owner = ?", (owner,)).fetchone()[0]
        if held < self.max_per_identity:
            return
        old = self.db.execute(
            "SELECT id FROM responses WHERE owner = ? AND final IS NOT NULL ORDER BY created_at LIMIT ?",
            (owner, held - self.max_per_identity + 1),
        ).fetchall()
        if len(old) < held - self.max_per_identity + 1:
            raise P.ProtocolError(
                P.E_QUOTA, f"{held} stored responses of yours are still running (at most {self.max_per_identity})"
            )
        self.db.executemany("DELETE FROM responses WHERE id = ?", old)
        self.evicted += len(old)
        log.info("event=responses_evicted owner=%r count=%s", owner, len(old))

    def end(self, pid: int, final: E.Event) -> None:
        """Request ``pid`` ended: the response it ran (if any) keeps its terminal event."""
        self.db.execute("UPDATE responses SET final = ? WHERE pid = ? AND final IS NULL", (pack(kept(final)), pid))

    def get(self, owner: str, rid: str) -> Stored:
        row = self.db.execute(
            "SELECT id, pid, created_at, background, record, input, final FROM responses "
            "WHERE id = ? AND owner = ? AND created_at >= ?",
            (rid, owner, time.time() - self.keep_s),
        ).fetchone()
        if row is None:
            raise P.ProtocolError(P.E_NOT_FOUND, f"no stored response {rid!r} of yours (unknown, expired or deleted)")
        ended = None if row[6] is None else E.decode(unpack(row[6]))
        return Stored(row[0], row[1], row[2], bool(row[3]), unpack(row[4]), unpack(row[5]), ended)

    def delete(self, owner: str, rid: str) -> Stored:
        stored = self.get(owner, rid)
        self.db.execute("DELETE FROM responses WHERE id = ?", (rid,))
        return stored

    def expire(self) -> int:
        """Drop responses older than ``keep_s`` that have ended; how many left."""
        old = time.time() - self.keep_s
        cur = self.db.execute("DELETE FROM responses WHERE created_at < ? AND final IS NOT NULL", (old,))
        return cur.rowcount

    def running(self) -> set[int]:
        """The pids of the requests stored responses wait on."""
        return {pid for (pid,) in self.db.execute("SELECT pid FROM responses WHERE final IS NULL")}

    def lost(self, pids: set[int]) -> None:
        """After a restart: responses whose requests are neither live nor ended were lost with them (a crash
        between a response's row and its request's): they end as failed, never as running forever."""
        for pid in pids:
            self.end(pid, E.Error(pid=pid, code=P.E_INTERNAL, message="its request was lost in a daemon restart"))

    def view(self) -> dict[str, Any]:
        count = self.db.execute("SELECT count(*) FROM responses").fetchone()[0]
        return {"stored": count, "evicted": self.evicted, "keep_s": self.keep_s}
