"""Deleting snapshot files off the context-switch path.

Unlinking a 22.7 MiB snapshot file costs about 3 ms here (the kernel frees its page cache),
as much as a fifth of a whole disk-tier round trip.  So a file that is done with is renamed
into a trash folder inside the state directory (microseconds: from then on it is gone from
where snapshots live) and a background thread unlinks it.  Before the manager writes a new
snapshot file it waits for the trash to empty, so the bytes on disk never exceed the disk
budget even counting files not yet unlinked.  A process that dies with trash left behind
gets it removed by ``disk.clean`` at the next start.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading

from contexts import disk

log = logging.getLogger("quantad.contexts")


class Reaper:
    def __init__(self, state_dir: str):
        self.trash = os.path.join(state_dir, disk.TRASH)
        os.makedirs(self.trash, mode=0o700, exist_ok=True)
        self._names = itertools.count()
        self._pending: list[str] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def discard(self, path: str) -> None:
        """Make ``path`` gone from the state directory now; its space is freed in the background."""
        doomed = os.path.join(self.trash, f"{os.getpid()}-{next(self._names)}{disk.DOOMED}")
        try:
            os.replace(path, doomed)
        except FileNotFoundError:
            return
        except OSError as exc:  # cannot rename (odd filesystem): delete it here and now
            log.debug("cannot move %s to the trash (%s): deleting it now", path, exc)
            disk.remove(path)
            return
        with self._cond:
            self._pending.append(doomed)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="quantad-reaper", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every discarded file is unlinked (before writing another: the disk budget)."""
        with self._cond:
            while self._pending:
                self._cond.wait()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                path = self._pending[0]
            disk.remove(path)
            with self._cond:
                self._pending.pop(0)
                self._cond.notify_all()
