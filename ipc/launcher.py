"""The one way to start ``quantad serve`` as a subprocess and know when it is ready.

Readiness is the daemon's own answer, never its output: ``wait_ready`` sends one ``ping`` with
``wait=True`` (``AsyncClient.wait_ready``; the daemon answers it once every worker is up) and
waits for that answer or for the process to exit, whichever comes first.  The exit is an event
too (a pidfd on Linux, elsewhere a thread blocked in ``waitid(WNOWAIT)``): no polling, no sleeps,
no scraping of the daemon's stderr.

    with DaemonProcess("--model", model_dir, "--slots", "2", log=tmp / "daemon.log").start() as d:
        with d.client() as c:
            print(c.chat("hello").text)

``DaemonProcess(*flags, endpoint=, env=, log=, cwd=, python=)`` runs
``python -m scheduler serve *flags --endpoint ENDPOINT``, output (stdout and stderr) into ``log``.
Without ``endpoint`` the daemon listens on ``ipc://DIR/agents.sock`` in a private temporary
directory (removed by ``stop``), without ``log`` its output goes to ``DIR/daemon.log``.
``env`` is added to ``os.environ`` (and ``PYTHONUNBUFFERED=1``).

- ``spawn()`` starts the process; ``wait_ready(timeout)`` (or ``await_ready`` inside an event
  loop) waits for it; ``start(ready_timeout)`` is both and returns ``self``.  A daemon that exits
  first, or is not ready in time, raises ``DaemonError`` (a ``RuntimeError``) with its log's tail;
  ``start`` then stops it.
- ``stop(timeout, cut=True)``: SIGTERM (the daemon drains), with ``cut`` also SIGINT (the second
  signal cuts the drain short), SIGKILL after ``timeout`` seconds; returns the exit code.
  ``kill()``: SIGKILL at once.  Both close the log; ``log()`` still reads it afterwards.

ipc is the floor: this module imports only the standard library and ipc.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

from ipc.client import AsyncClient, Client

LOG_TAIL_LINES = 40


class DaemonError(RuntimeError):
    """The daemon exited before it was ready (``returncode`` is its exit code) or was not ready in time (None)."""

    def __init__(self, message: str, returncode: int | None, log: str):
        super().__init__(message)
        self.returncode, self.log = returncode, log


class DaemonProcess:
    """``python -m scheduler serve`` as a child process, ready once it answers ``ping``."""

    def __init__(
        self,
        *flags: str,
        endpoint: str | None = None,
        env: dict[str, str] | None = None,
        log: str | Path | None = None,
        cwd: str | Path | None = None,
        python: str = sys.executable,
    ):
        self.tmp: Path | None = None  # the private directory, when endpoint or log needs one
        if endpoint is None or log is None:
            self.tmp = Path(tempfile.mkdtemp(prefix="quantad-"))
        self.endpoint = endpoint or f"ipc://{self.tmp}/agents.sock"
        self.log_path = Path(log) if log is not None else self.tmp / "daemon.log"
        self.cmd = [python, "-m", "scheduler", "serve", *flags, "--endpoint", self.endpoint]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if self.tmp is not None and "QUANTAD_STATE_DIR" not in self.env:  # one daemon per state directory
            self.env["QUANTAD_STATE_DIR"] = str(self.tmp / "state")
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self._out: IO[str] | None = None
        self._final_log: str | None = None  # read before the private directory goes

    # ---- life cycle ---------------------------------------------------------------------------
    def spawn(self) -> DaemonProcess:
        """Start the process (not waiting for it)."""
        self._out = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
        )
        return self

    def start(self, ready_timeout: float = 180.0) -> DaemonProcess:
        """Spawn and wait until ready; on failure the process is stopped and ``DaemonError`` raised."""
        self.spawn()
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def wait_ready(self, timeout: float | None = 180.0) -> dict[str, Any]:
        """Block until the daemon answers ``ping`` with every worker up; returns that answer."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.await_ready(timeout))
        # Called from inside an event loop (a blocking call there anyway): wait on a loop of our own.
        box: dict[str, Any] = {}

        def wait() -> None:
            try:
                box["pong"] = asyncio.run(self.await_ready(timeout))
            except BaseException as exc:  # handed to the caller's thread below
                box["error"] = exc

        t = threading.Thread(target=wait, name="quantad-wait-ready")
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["pong"]

    async def await_ready(self, timeout: float | None = 180.0) -> dict[str, Any]:
        """``wait_ready`` for a caller inside an event loop."""
        assert self.proc is not None, "spawn() first"
        async with AsyncClient(self.endpoint) as client:
            ready = asyncio.ensure_future(client.wait_ready(timeout))
            exited = _exit_future(self.proc)
            try:
                await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
            finally:
                exited.cancel()
            if ready.done():
                try:
                    return ready.result()
                except TimeoutError:
                    msg = f"quantad serve not ready in {timeout} s:\n{self.tail()}"
                    raise DaemonError(msg, None, self.log()) from None
            ready.cancel()
            await asyncio.gather(ready, return_exceptions=True)
            code = self.proc.wait()
            raise DaemonError(f"quantad serve exited with code {code}:\n{self.tail()}", code, self.log())

    def stop(self, timeout: float = 30.0, cut: bool = True) -> int:
        """SIGTERM (and SIGINT with ``cut``: no drain), SIGKILL after ``timeout`` s; the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if cut:
                self.proc.send_signal(signal.SIGINT)  # a second signal cuts the drain
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self._closed()

    def kill(self) -> int:
        """SIGKILL now (workers die with their daemon); the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self._closed()

    def _closed(self) -> int:
        if self._out is not None and not self._out.closed:
            self._out.close()
        if self.tmp is not None and self.tmp.exists():
            self._final_log = self.log()
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.proc.returncode if self.proc is not None else 0

    def __enter__(self) -> DaemonProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- reading it -----------------------------------------------------------------------------
    def log(self) -> str:
        """Everything the daemon wrote so far (stdout and stderr)."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def client(self, **kw: Any) -> Client:
        return Client(self.endpoint, **kw)

    def aclient(self, **kw: Any) -> AsyncClient:
        return AsyncClient(self.endpoint, **kw)


def _exit_future(proc: subprocess.Popen) -> asyncio.Future:
    """A future done when ``proc`` exits, without reaping it (``Popen`` still gets its exit code)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def done() -> None:
        if not fut.done():
            fut.set_result(None)

    if proc.poll() is not None:
        done()
        return fut
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (not Linux, or an old kernel): a thread waits instead

        def wait() -> None:
            try:
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:  # reaped already
                pass
            try:
                loop.call_soon_threadsafe(done)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        threading.Thread(target=wait, name=f"quantad-exit-{proc.pid}", daemon=True).start()
        return fut
    loop.add_reader(fd, done)

    def close(_: asyncio.Future) -> None:
        loop.remove_reader(fd)
        os.close(fd)

    fut.add_done_callback(close)
    return fut
