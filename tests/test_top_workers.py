"""``quantad workers`` and ``quantad top`` against a real daemon; ``top`` also in a real terminal (tmux)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from ipc import protocol as P
from tests.conftest import REPO, DaemonProc, messages

DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory):
    d = DaemonProc(tiny_model_dir, tmp_path_factory.mktemp("top"), "--workers", "2", "--quantum-tokens", "2",
                   "--heartbeat-s", "0.2")  # fmt: skip
    yield d
    d.stop()


def quantad(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "console", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, stdin=subprocess.DEVNULL)  # fmt: skip


def test_workers_json_and_table(daemon, tiny_model_dir):
    ep = ["--endpoint", daemon.endpoint]
    end = time.monotonic() + DEADLINE_S
    while True:  # the memory figures come with each worker's first heartbeat
        out = quantad("workers", "--json", *ep)
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        if all(w["rss_bytes"] is not None for w in data["workers"]):
            break
        assert time.monotonic() < end, data
    assert data["heartbeat_s"] == 0.2 and data["liveness_s"] == 30.0
    assert [w["name"] for w in data["workers"]] == ["w0", "w1"]
    for w in data["workers"]:
        assert w["state"] == "up" and w["alive"] is True and w["restarts"] == 0
        assert w["slots"] == 1 and w["used"] == 0 and w["running"] == []
        assert w["device"] == "cpu" and w["backend"] == "hf" and w["model"] == str(tiny_model_dir)
        assert isinstance(w["pid"], int) and 0 <= w["heartbeat_age_s"] < 30.0
        assert set(w["memory"]) == set(P.TIERS) and all(isinstance(v, int) for v in w["memory"].values())
        assert w["rss_bytes"] > 0 and w["host_available_bytes"] > 0
    assert sorted(daemon.worker_pids()) == sorted(w["pid"] for w in data["workers"])

    with daemon.client(timeout=DEADLINE_S) as c:
        cid = c.submit(messages("a long answer"), max_tokens=2000, min_tokens=2000)
        it = c.events(cid)
        pid = next(it).data["pid"]
        next(it)
        busy = c.workers()["workers"]
        (row,) = [w for w in busy if w["running"] == [pid]]
        assert row["used"] == 1
        text = quantad("workers", *ep).stdout.splitlines()
        assert text[0].split()[:4] == ["WORKER", "STATE", "PID", "SLOTS"]
        assert any(line.split()[:2] == [row["name"], "up"] and "1/1" in line for line in text[1:]), text
        c.kill(pid)
        assert list(it)[-1].event == P.EV_CANCELLED


def test_top_once_and_json(daemon):
    ep = ["--endpoint", daemon.endpoint]
    with daemon.client(timeout=DEADLINE_S) as c:
        cid = c.submit(messages("a long answer"), max_tokens=2000, min_tokens=2000, agent="top-test")
        it = c.events(cid)
        pid = next(it).data["pid"]
        next(it)
        snap = json.loads(quantad("top", "--json", *ep).stdout)
        assert set(snap) == {"stats", "workers", "ps"}
        assert snap["stats"]["phase"] == "serving" and snap["stats"]["requests"]["RUNNING"] == 1
        assert snap["stats"]["tokens"] >= 1 and snap["stats"]["tokens_per_s"] >= 0
        assert [r["pid"] for r in snap["ps"]["requests"]] == [pid]
        screen = quantad("top", "--once", *ep).stdout
        assert "quantad serving" in screen and "Workers: 2/2 up" in screen
        assert any(line.split()[:3] == [str(pid), "top-test", "RUNNING"] for line in screen.splitlines()), screen
        piped = quantad("top", "--interval", "0.5", *ep)  # no terminal: says what to use instead
        assert piped.returncode == 2 and "--once" in piped.stderr
        c.kill(pid)
        assert list(it)[-1].event == P.EV_CANCELLED
    gone = quantad("top", "--once", "--endpoint", f"ipc://{daemon.tmp}/nobody.sock")
    assert gone.returncode == 3 and "is 'quantad serve' running?" in gone.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed (`make test` installs it)")
def test_top_in_a_terminal(daemon, tmp_path):
    """A real terminal: tmux at a fixed size runs `quantad top`; the screen shows the rows; `q` quits it."""
    sock, rc = str(tmp_path / "tmux.sock"), tmp_path / "rc"
    tmux = ["tmux", "-S", sock]
    cmd = (f"cd {shlex.quote(str(REPO))} && {shlex.quote(sys.executable)} -m scheduler top --interval 0.2 "
           f"--endpoint {shlex.quote(daemon.endpoint)}; echo $? > {shlex.quote(str(rc))}")  # fmt: skip
    env = dict(os.environ, TERM="xterm-256color")
    with daemon.client(timeout=DEADLINE_S) as c:
        cid = c.submit(messages("a long answer"), max_tokens=2000, min_tokens=2000, agent="in-tmux")
        it = c.events(cid)
        pid = next(it).data["pid"]
        subprocess.run([*tmux, "new-session", "-d", "-s", "top", "-x", "150", "-y", "40", cmd], check=True, env=env)
        try:
            end = time.monotonic() + DEADLINE_S
            while True:
                screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True,
                                        text=True).stdout  # fmt: skip
                lines = screen.splitlines()
                worker_rows = [ln for ln in lines if ln.split()[:2] in (["w0", "up"], ["w1", "up"])]
                request_row = any(ln.split()[:3] == [str(pid), "in-tmux", "RUNNING"] for ln in lines)
                if len(worker_rows) == 2 and request_row and "q: quit" in screen:
                    break
                assert time.monotonic() < end, screen
            assert lines[0].startswith("quantad serving") and "Workers: 2/2 up" in screen
            subprocess.run([*tmux, "send-keys", "-t", "top", "q"], check=True)
            while not (rc.exists() and rc.read_text().strip()):
                assert time.monotonic() < end, "quantad top did not quit on q"
            assert rc.read_text().strip() == "0"
        finally:
            subprocess.run([*tmux, "kill-server"], capture_output=True)
        c.kill(pid)
        assert list(it)[-1].event == P.EV_CANCELLED
