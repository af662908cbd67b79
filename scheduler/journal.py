"""The journal: every accepted request and its streamed output, in SQLite (WAL) in the state directory.

A daemon killed at any moment loses nothing it acknowledged: a chat is committed before
its ``accepted`` is sent, and its output at each quantum end (one transaction for all the
quantum ends of an event-loop turn, so a batched step costs one commit).  Tokens streamed
after the last commit are recomputed after a restart: greedy or seeded sampling gives the
same ones again, and clients that resume say how much they already have.  Ended requests
keep their terminal event for ``keep_s`` (``quantad run --attach`` reads it), then leave.

Rows hold msgpack (params, the agent's id, the terminal event) and int32 arrays (token
ids): nothing read back is unpickled.  ``synchronous=NORMAL`` in WAL mode: a commit
survives the daemon's death (SIGKILL, a crash); only a power cut may lose the last ones.
A commit in that mode does not wait for the disk, but SQLite's automatic checkpoint (every
1000 pages of WAL) copies the WAL into the database and fsyncs it, inside whichever commit
crossed the mark: on the event loop, a stall of the whole daemon.  So checkpoints run in a
thread of their own (``Checkpointer``, on its own connection), off the loop.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from ipc import events as E
from scheduler.request import Request

log = logging.getLogger("quantad")

# The torn-write test's hook: the daemon SIGKILLs itself right after this commit (1 = the first).
CRASH_AFTER = "QUANTAD_TEST_CRASH_AFTER_COMMIT"

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    pid INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    client_id BLOB NOT NULL,
    agent_addr BLOB NOT NULL,
    params BLOB NOT NULL,
    accepted_at REAL NOT NULL,
    tokens BLOB NOT NULL DEFAULT x'',
    text TEXT NOT NULL DEFAULT '',
    generated INTEGER NOT NULL DEFAULT 0,
    final BLOB,
    ended_at REAL
);
CREATE INDEX IF NOT EXISTS requests_open ON requests (ended_at);
"""


def _ids(blob: bytes) -> list[int]:
    a = array.array("i")
    a.frombytes(blob[: len(blob) - len(blob) % a.itemsize])
    return a.tolist()


def _blob(ids: list[int]) -> bytes:
    return array.array("i", ids).tobytes()


def unpack(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False)


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def kept(final: E.Event) -> dict[str, Any]:
    """A terminal event as it is kept: its map, without the id and sequence number it was sent under."""
    return {k: v for k, v in final.encode().items() if k not in ("seq", "id")}


CHECKPOINT_S = 1.0  # how often the checkpointer copies the WAL into the database


class Checkpointer(threading.Thread):
    """WAL checkpoints (and their fsync) on a connection and a thread of their own, never on the event loop."""

    def __init__(self, path: Path):
        super().__init__(name="journal-checkpoint", daemon=True)
        self.path = path
        self.stopping = threading.Event()

    def run(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            while not self.stopping.wait(CHECKPOINT_S):
                self._checkpoint(db, "PASSIVE")  # never waits for the writer: what it cannot copy waits a turn
            self._checkpoint(db, "TRUNCATE")
        finally:
            db.close()

    def _checkpoint(self, db: sqlite3.Connection, mode: str) -> None:
        try:
            db.execute(f"PRAGMA wal_checkpoint({mode})")
        except sqlite3.Error as exc:  # busy or locked: the next turn tries again
            log.debug("event=journal_checkpoint_skipped error=%r", str(exc))

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)


@dataclass
class Ended:
    """A finished request still in the journal: what ``attach`` replays."""

    pid: int
    owner: str
    client_id: Any
    final: E.Event  # its terminal event, under no id


class Journal:
    durable = True  # what it accepted outlives the daemon

    def __init__(self, path: Path, keep_s: float = 300.0):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path, self.keep_s = path, keep_s
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's job, off the loop
        self.db.executescript(SCHEMA)
        self.checkpointer = Checkpointer(path)
        self.checkpointer.start()
        self._dirty: dict[int, Request] = {}
        self._ends: dict[int, dict[str, Any]] = {}
        self._flush_soon = False
        self.commits = 0
        self.crash_after = int(os.environ.get(CRASH_AFTER, "0") or 0)
        self.recovered, self.recovery_s = 0, 0.0  # at start: requests taken back, and the time it took
        self.busy_s = 0.0  # time spent in the journal's writes (its cost, for the benchmark)

    # ---- writes -----------------------------------------------------------------------------
    def accept(self, req: Request) -> None:
        """Commit a new chat now: its ``accepted`` goes out only after this returns."""
        t0 = time.perf_counter()
        self.db.execute(
            "INSERT OR REPLACE INTO requests (pid, owner, client_id, agent_addr, params, accepted_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (req.pid, req.owner, pack(req.client_id), req.agent_addr, pack(req.params.wire()), time.time()),
        )
        self._committed(t0)

    def _committed(self, t0: float) -> None:
        self.commits += 1
        self.busy_s += time.perf_counter() - t0
        if self.commits == self.crash_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def checkpoint(self, req: Request) -> None:
        """Its output so far is to be committed (with every other one of this loop turn)."""
        self._dirty[req.pid] = req
        self._soon()

    def end(self, req: Request, final: E.Event) -> None:
        """It ended: its terminal event is kept (``keep_s``), and it will not be recovered."""
        self._dirty.pop(req.pid, None)
        self._ends[req.pid] = kept(final)
        self._soon()

    def _soon(self) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop running: at once
                self.flush()

    def flush(self) -> None:
        """One transaction for what this loop turn checkpointed and ended."""
        self._flush_soon = False
        if not self._dirty and not self._ends:
            return
        t0 = time.perf_counter()
        dirty, ends, self._dirty, self._ends = self._dirty, self._ends, {}, {}
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(
                "UPDATE requests SET tokens = ?, text = ?, generated = ? WHERE pid = ?",
                [(_blob(r.tokens), r.text, r.generated, pid) for pid, r in dirty.items()],
            )
            self.db.executemany(
                "UPDATE requests SET final = ?, ended_at = ? WHERE pid = ?",
                [(pack(final), now, pid) for pid, final in ends.items()],
            )
        self._committed(t0)

    def expire(self) -> int:
        """Drop ended requests older than ``keep_s``; how many left."""
        old = time.time() - self.keep_s
        cur = self.db.execute("DELETE FROM requests WHERE ended_at IS NOT NULL AND ended_at < ?", (old,))
        return cur.rowcount

    def keep_unfinished(self, reqs: list[Request]) -> None:
        """A hand-over (or a drain cut short): these stay in the journal with their output, for the next daemon."""
        for req in reqs:
            self._ends.pop(req.pid, None)
            self._dirty[req.pid] = req
        self.flush()

    # ---- reads ------------------------------------------------------------------------------
    def unfinished(self) -> list[Request]:
        """The requests a dead predecessor accepted and did not end, as the queue takes them back (oldest first)."""
        t0 = time.perf_counter()
        rows = self.db.execute(
            "SELECT pid, owner, client_id, agent_addr, params, tokens, text, generated FROM requests "
            "WHERE ended_at IS NULL ORDER BY pid"
        ).fetchall()
        out = []
        for pid, owner, cid, addr, params, tokens, text, generated in rows:
            try:
                fields = {"client_id": unpack(cid), "params": unpack(params), "tokens": _ids(tokens)}
                req = Request(pid=pid, agent_addr=bytes(addr), owner=owner, text=text, generated=generated, **fields)
            except (msgpack.UnpackException, KeyError, TypeError, ValueError) as exc:  # damaged: said, then dropped
                log.error("event=journal_bad_row pid=%s error=%r", pid, str(exc))
                self.db.execute("DELETE FROM requests WHERE pid = ?", (pid,))
                continue
            req.recover()
            out.append(req)
        self.recovered, self.recovery_s = len(out), time.perf_counter() - t0
        return out

    def ended(self, owner: str | None, pid: int | None, client_id: Any) -> Ended | None:
        """A finished request by pid (any owner; the caller checks), or the owner's by its agent id."""
        if pid is not None:
            row = self.db.execute(
                "SELECT pid, owner, client_id, final FROM requests WHERE pid = ? AND final IS NOT NULL", (pid,)
            ).fetchone()
        else:
            row = self.db.execute(
                "SELECT pid, owner, client_id, final FROM requests WHERE owner = ? AND client_id = ? AND "
                "final IS NOT NULL ORDER BY pid DESC LIMIT 1",
                (owner or "", pack(client_id)),
            ).fetchone()
        if row is None:
            return None
        return Ended(row[0], row[1], unpack(row[2]), E.decode(unpack(row[3])))

    def view(self) -> dict[str, Any]:
        """For ``stats``: where it is, its commits, and the time its writes took (its cost)."""
        return {"path": str(self.path), "commits": self.commits, "busy_s": round(self.busy_s, 6),
                "recovered": self.recovered, "recovery_s": round(self.recovery_s, 6)}  # fmt: skip

    def max_pid(self) -> int:
        return self.db.execute("SELECT coalesce(max(pid), 0) FROM requests").fetchone()[0]

    def open_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM requests WHERE ended_at IS NULL").fetchone()[0]

    def close(self) -> None:
        self.flush()
        self.checkpointer.stop()
        self.db.close()


class NullJournal:
    """The journal when ``--no-journal``: keeps nothing, so callers never ask whether there is one."""

    durable = False  # a stopping daemon cannot leave requests to the next one
    recovery_s = 0.0

    def accept(self, req: Request) -> None: ...

    def checkpoint(self, req: Request) -> None: ...

    def end(self, req: Request, final: E.Event) -> None: ...

    def expire(self) -> int:
        return 0

    def keep_unfinished(self, reqs: list[Request]) -> None: ...

    def unfinished(self) -> list[Request]:
        return []

    def ended(self, owner: str | None, pid: int | None, client_id: Any) -> Ended | None:
        return None

    def view(self) -> None:
        return None

    def max_pid(self) -> int:
        return 0

    def close(self) -> None: ...
