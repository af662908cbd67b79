"""The servers a sweep point runs against: ``quantad serve`` and the peers, ``transformers serve``
and llama.cpp's ``llama-server``.

All are subprocesses with their output in a log file under the run's ``logs/``.  A server
that exits before it is ready raises ``ServerError`` with the reason from its log (for
``quantad serve``: an unknown ``--policy`` is rejected this way).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from ipc.launcher import DaemonError, DaemonProcess

REPO = Path(__file__).resolve().parents[2]


class ServerError(RuntimeError):
    pass


class PolicyRejected(ServerError):
    """``quantad serve`` does not know the policy: every point of that policy fails the same way."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class QuantadServer:
    """``quantad serve --policy P --quantum-ms Q`` on a private ipc socket (``ipc.launcher``)."""

    def __init__(
        self,
        model_dir: str,
        policy: str,
        quantum_ms: float,
        log_path: Path,
        slots: int = 1,
        workers: int = 1,
        extra: list[str] | None = None,
    ):
        self.tmp = tempfile.mkdtemp(prefix="qd-bench-")
        self.policy = policy
        q = "inf" if math.isinf(quantum_ms) else f"{quantum_ms:g}"
        flags = ["--model", model_dir, "--policy", policy, "--quantum-ms", q, "--slots", str(slots)]
        flags += ["--workers", str(workers), "--disk-budget", "0", "--log-level", "WARNING", *(extra or [])]
        endpoint = f"ipc://{self.tmp}/agents.sock"
        env = {"QUANTAD_RUNTIME_DIR": self.tmp}
        self.daemon = DaemonProcess(*flags, endpoint=endpoint, env=env, log=log_path, cwd=REPO).spawn()
        self.endpoint, self.log_path, self.proc = endpoint, log_path, self.daemon.proc

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        try:
            self.daemon.wait_ready(timeout_s)
        except DaemonError as exc:
            if exc.returncode is not None:
                raise self._why() from None
            raise ServerError(f"quantad serve not ready in {timeout_s:g} s:\n{_tail(self.log_path)}") from None

    def _why(self) -> ServerError:
        log = _tail(self.log_path)
        rejected = [line for line in log.splitlines() if "--policy" in line and "invalid choice" in line]
        if rejected:
            choices = rejected[-1].split("invalid choice:", 1)[1].strip()
            return PolicyRejected(f"quantad serve rejected policy {self.policy!r}: {choices}")
        return ServerError(f"quantad serve exited with code {self.proc.returncode}:\n{log}")

    def stop(self) -> None:
        self.daemon.stop(cut=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eos_token_id(model_dir: str) -> int | list[int] | None:
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((Path(model_dir) / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if value is not None:
            return value
    return None


READY_LINE = b"Uvicorn running on"  # uvicorn apps (transformers serve): this line means the port listens


class HttpServer:
    """An OpenAI-compatible server as a subprocess, its output copied to a log, ready once it listens.

    Readiness is an event, not a poll: a thread copies the server's output into the log and sets
    it when the server prints ``ready_line`` (uvicorn's "listening") or when the output ends (the
    server died).  Then one ``/models`` request names the served model.  ``ready_s``: start to ready.
    """

    ready_line = READY_LINE

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path, timeout_s: float):
        self.name, self.port, self.log_path = name, port, log_path
        t0 = time.monotonic()
        self.url = f"http://127.0.0.1:{port}/v1"
        self._ready, self._listening = threading.Event(), False
        self._log = open(log_path, "wb")
        try:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
            )
        except OSError as exc:
            self._log.close()
            raise ServerError(f"cannot start {name}: {exc}") from None
        self._copier = threading.Thread(target=self._copy, name=f"{name}-log", daemon=True)
        self._copier.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise ServerError(f"{name} not up in {timeout_s:g} s:\n{_tail(log_path)}")
        if not self._listening:
            self.proc.wait(30)
            self._copier.join(5)
            raise ServerError(f"{name} exited with code {self.proc.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=30) as r:
                self.model = json.load(r)["data"][0]["id"]
        except (OSError, ValueError, KeyError, IndexError) as exc:
            self.stop()
            raise ServerError(f"{name} listens but lists no model ({exc}):\n{_tail(log_path)}") from None
        self.ready_s = time.monotonic() - t0

    def _copy(self) -> None:
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            if not self._listening and self.ready_line in line:
                self._listening = True
                self._ready.set()
        self._ready.set()  # the output ended: the server is gone

    def stop(self, timeout_s: float = 30.0) -> None:
        _stop(self.proc, timeout_s)
        self._copier.join(5)
        if not self._log.closed:
            self._log.close()


class PeerServer(HttpServer):
    """``transformers serve MODEL_DIR --continuous-batching --device cpu``: batches, never preempts."""

    def __init__(self, model_dir: str, log_path: Path, device: str = "cpu", timeout_s: float = 300.0):
        port = free_port()
        exe = Path(sys.executable).parent / "transformers"
        cmd = [str(exe) if exe.exists() else "transformers", "serve", model_dir, "--continuous-batching"]
        cmd += ["--device", device, "--host", "127.0.0.1", "--port", str(port)]
        super().__init__("transformers serve", cmd, port, log_path, timeout_s)


LLAMA_SERVER_MISSING = "llama-server is not built: run `make llama-server`"


def llama_server_exe() -> str:
    """``llama-server`` beside this interpreter (``make llama-server`` puts it in the venv), else on PATH."""
    exe = Path(sys.executable).parent / "llama-server"
    if exe.is_file() and os.access(exe, os.X_OK):
        return str(exe)
    found = shutil.which("llama-server")
    if found is None:
        raise ServerError(LLAMA_SERVER_MISSING)
    return found


def resolve_gguf(model: str) -> str:
    """The model's GGUF file, from the model store in a child process (no torch here)."""
    cmd = [sys.executable, "-m", "backends.model_store", "--gguf", model]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        why = out.stderr.strip() or f"{' '.join(cmd)} exited with code {out.returncode}"
        raise ServerError(f"llama-server needs a GGUF model: {why}")
    return lines[-1]


class LlamaServer(HttpServer):
    """llama.cpp's ``llama-server -m GGUF -np SLOTS``: continuous batching over SLOTS slots, never preempts.

    ``-c`` is the context of all slots together (``max(2048 * slots, 4096)``); ``-t``: one thread per
    core.  It loads the model before it listens, then logs ``listening on http://...``: ready.
    """

    ready_line = b"listening on"

    def __init__(self, gguf: str, slots: int, log_path: Path, timeout_s: float = 300.0, threads: int | None = None):
        port = free_port()
        cmd = [llama_server_exe(), "-m", gguf, "-np", str(slots), "-c", str(max(2048 * slots, 4096))]
        cmd += ["-t", str(threads or os.cpu_count() or 1), "--host", "127.0.0.1", "--port", str(port)]
        super().__init__("llama-server", cmd, port, log_path, timeout_s)
