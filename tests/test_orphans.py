"""Workers do not outlive their daemon: a SIGKILL of ``quantad serve`` leaves no worker process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

from ipc.launcher import DaemonProcess
from tests.conftest import REPO, messages


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_workers_exit_when_the_daemon_is_killed(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--workers", "2")
    with d.client(timeout=120) as c:
        c.submit(messages("a long one, cut short"), max_tokens=500, temperature=0.0)
        pids = d.worker_pids()
    assert len(pids) == 2
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    procs = []
    for p in pids:
        try:
            procs.append(psutil.Process(p))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs([p for p in procs if running(p.pid)], timeout=30)
    assert alive == [], f"workers {alive} outlived their daemon"


def test_one_daemon_per_state_directory_and_a_dead_ones_is_free(tiny_model_dir, start_daemon, tmp_path):
    d = start_daemon(tiny_model_dir)
    d.wait_ready()
    env = dict(os.environ, QUANTAD_STATE_DIR=str(d.state_dir))
    second = ["serve", "--model", str(tiny_model_dir), "--endpoint", f"ipc://{tmp_path}/b.sock"]
    out = subprocess.run([sys.executable, "-m", "console", *second], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1 and f"another daemon (pid {d.proc.pid})" in out.stderr
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    with DaemonProcess("--model", str(tiny_model_dir), endpoint=f"ipc://{tmp_path}/b.sock",
                       env={"QUANTAD_STATE_DIR": str(d.state_dir)}, log=tmp_path / "b.log", cwd=REPO) as b:  # fmt: skip
        with b.client(timeout=60) as c:
            assert c.ping()["pong"]
