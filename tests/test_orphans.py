"""Workers do not outlive their daemon: a SIGKILL of ``quantad serve`` leaves no worker process."""

from __future__ import annotations

import os
import signal
import time

import psutil

from tests.conftest import messages


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
    deadline = time.monotonic() + 30
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if running(p)]
        time.sleep(0.05)  # polling the process table with a deadline
    assert alive == [], f"workers {alive} outlived their daemon"
