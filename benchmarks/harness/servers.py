"""The servers a sweep point runs against: ``quantad serve`` and the ``transformers serve`` peer.

Both are subprocesses with their output in a log file under the run's ``logs/``.  A server
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
import time
import urllib.request
from pathlib import Path

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
    """``quantad serve --policy P --quantum-ms Q`` on a private ipc socket."""

    def __init__(self, model_dir: str, policy: str, quantum_ms: float, log_path: Path, slots: int = 1,
                 workers: int = 1, extra: list[str] | None = None):  # fmt: skip
        self.tmp = tempfile.mkdtemp(prefix="qd-bench-")
        self.endpoint = f"ipc://{self.tmp}/agents.sock"
        self.log_path = log_path
        self.policy = policy
        q = "inf" if math.isinf(quantum_ms) else f"{quantum_ms:g}"
        cmd = [sys.executable, "-m", "scheduler", "serve", "--model", model_dir, "--endpoint", self.endpoint,
               "--policy", policy, "--quantum-ms", q, "--slots", str(slots), "--workers", str(workers),
               "--disk-budget", "0", "--log-level", "WARNING", *(extra or [])]  # fmt: skip
        env = dict(os.environ, QUANTAD_RUNTIME_DIR=self.tmp, PYTHONUNBUFFERED="1")
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)  # fmt: skip

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        from ipc.client import Client

        deadline = time.monotonic() + timeout_s
        with Client(self.endpoint) as c:
            while True:
                if self.proc.poll() is not None:
                    raise self._why()
                try:
                    c.wait_ready(2.0)
                    return
                except TimeoutError:
                    if time.monotonic() > deadline:
                        msg = f"quantad serve not ready in {timeout_s:g} s:\n{_tail(self.log_path)}"
                        raise ServerError(msg) from None

    def _why(self) -> ServerError:
        log = _tail(self.log_path)
        rejected = [line for line in log.splitlines() if "--policy" in line and "invalid choice" in line]
        if rejected:
            choices = rejected[-1].split("invalid choice:", 1)[1].strip()
            return PolicyRejected(f"quantad serve rejected policy {self.policy!r}: {choices}")
        return ServerError(f"quantad serve exited with code {self.proc.returncode}:\n{log}")

    def stop(self) -> None:
        _stop(self.proc)
        self._log.close()
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


class PeerServer:
    """``transformers serve MODEL_DIR --continuous-batching --device cpu``: batches, never preempts."""

    def __init__(self, model_dir: str, log_path: Path, device: str = "cpu", timeout_s: float = 300.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        exe = Path(sys.executable).parent / "transformers"
        cmd = [str(exe) if exe.exists() else "transformers", "serve", model_dir, "--continuous-batching",
               "--device", device, "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        self._log = open(log_path, "w")
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        except OSError as exc:
            self._log.close()
            raise ServerError(f"cannot start transformers serve: {exc}") from None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                self._log.close()
                raise ServerError(f"transformers serve exited with code {self.proc.returncode}:\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                    self.model = json.load(r)["data"][0]["id"]
                    return
            except (OSError, ValueError, KeyError, IndexError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerError(f"transformers serve not up in {timeout_s:g} s:\n{_tail(log_path)}") from None
                time.sleep(0.3)  # polling a server's readiness, with a deadline

    def stop(self) -> None:
        _stop(self.proc)
        if not self._log.closed:
            self._log.close()
