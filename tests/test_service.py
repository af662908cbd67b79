"""Running quantad as a service: the notify protocol, SIGTERM drain, SIGHUP reload, config, logs, the unit."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipc import protocol as P
from ipc.client import Client
from ipc.launcher import DaemonProcess
from ipc.logfmt import Formatter, pairs
from scheduler import config as C
from scheduler.options import serve_parser
from tests.conftest import REPO, messages

UNIT = REPO / "deploy" / "quantad.service"


class Notify:
    """The systemd side of sd_notify: a unix datagram socket, here in the abstract namespace or on a path."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.seen: list[str] = []

    def wait_for(self, line: str, timeout: float = 180.0) -> list[str]:
        """Messages (each a list of lines joined by newlines) up to and including one holding ``line``."""
        end = time.monotonic() + timeout
        got = []
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {line!r} from the daemon in {timeout} s; got {got}")
            self.sock.settimeout(left)
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            got.append(msg)
            self.seen.append(msg)
            if line in msg.split("\n"):
                return got

    def close(self) -> None:
        self.sock.close()


class Serve:
    """``quantad serve`` with a notify socket and any environment, logging to a file (not waited for)."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None, notify: str | None = None):
        self.notify = Notify(notify or str(tmp / "notify.sock"))
        log = tmp / "daemon.log"
        log.touch()  # journald's JOURNAL_STREAM names the file by device and inode
        full = {"QUANTAD_RUNTIME_DIR": str(tmp), "QUANTAD_STATE_DIR": str(tmp / "s")}
        full |= {"NOTIFY_SOCKET": self.notify.address, **(env or {})}
        if full.get("JOURNAL_STREAM") == "this":  # journald's variable, pointing at our log file
            st = log.stat()
            full["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        ep = f"ipc://{tmp}/agents.sock"
        self.daemon = DaemonProcess(*args, endpoint=ep, env=full, log=log, cwd=REPO).spawn()
        self.endpoint, self.log_path, self.proc = ep, log, self.daemon.proc

    def log(self) -> str:
        return self.daemon.log()

    def client(self) -> Client:
        return Client(self.endpoint, timeout=60)

    def close(self) -> None:
        self.daemon.kill()
        self.notify.close()


@pytest.fixture
def serve(tmp_path_factory):
    started: list[Serve] = []

    def start(*args: str, **kw) -> Serve:
        s = Serve(tmp_path_factory.mktemp("svc"), *args, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def test_notify_ready_watchdog_status_stopping_and_journald_lines(tiny_model_dir, serve):
    d = serve("--model", str(tiny_model_dir), "--workers", "2", notify=f"@quantad-test-{os.getpid()}",
              env={"WATCHDOG_USEC": "200000", "JOURNAL_STREAM": "this"})  # fmt: skip
    before = d.notify.wait_for("READY=1")
    log = d.log()
    assert log.count("event=worker_ready") == 2, log  # READY only once both workers are up
    assert log.index("event=worker_ready") < log.index("event=ready")
    with d.client() as c:
        pong = c.ping()
        assert pong["workers_ready"] == pong["workers"] == 2
    statuses = [line for m in before for line in m.split("\n") if line.startswith("STATUS=")]
    assert statuses and any("workers 2/2 up" in s for s in d.notify.wait_for("WATCHDOG=1") + statuses)

    pings = 0
    t0 = time.monotonic()
    while pings < 10:  # every 0.1 s: ten of them come well within the bound
        d.notify.wait_for("WATCHDOG=1", timeout=30)
        pings += 1
    assert time.monotonic() - t0 < 30

    d.proc.send_signal(signal.SIGTERM)
    d.notify.wait_for("STOPPING=1", timeout=30)
    assert d.proc.wait(60) == 0
    lines = [line for line in d.log().splitlines() if line.strip()]
    daemon_lines = [line for line in lines if "event=" in line and "worker=w" not in line]
    # journald: a <N> priority prefix, no timestamp, one line per event (worker lines too)
    assert daemon_lines and all(re.match(r"<[0-7]>level=\w+ ", line) for line in daemon_lines), lines[:5]
    assert all("ts=" not in line for line in daemon_lines)
    assert not any("Loading weights" in line or "quantad: ready on" in line for line in lines)


def test_no_ready_when_startup_fails(tiny_model_dir, serve, tmp_path):
    bad = serve("--model", str(tmp_path / "no-such-model"))
    assert bad.proc.wait(120) != 0
    broken = serve("--model", str(tiny_model_dir), "--device", "no-such-device")  # workers die at start-up
    assert broken.proc.wait(180) != 0
    assert "event=fatal" in broken.log() and "start-up" in broken.log()
    for d in (bad, broken):
        d.notify.sock.settimeout(0)
        got = []
        try:
            while True:
                got.append(d.notify.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        assert not any("READY=1" in m.split("\n") for m in got), got


def test_sigterm_drains_every_request_and_exits_zero(tiny_model_dir, serve):
    grace = 2.0  # shorter than the running request needs: it is cut at the deadline, or finishes
    d = serve("--model", str(tiny_model_dir), "--slots", "1", "--quantum-tokens", "2", "--grace-s", str(grace))
    d.notify.wait_for("READY=1")
    with d.client() as c:
        ids = [c.submit(messages(f"story number {i}"), max_tokens=1500) for i in range(3)]
        streams = {cid: c.events(cid) for cid in ids}
        events = {cid: [] for cid in ids}
        for cid in ids:  # all accepted
            events[cid].append(next(streams[cid]))
        while not any(e.event == P.EV_TOKEN for e in events[ids[1]]):  # the first was preempted already
            events[ids[1]].append(next(streams[ids[1]]))
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        d.notify.wait_for("STOPPING=1", timeout=30)
        late = c.submit(messages("too late"), max_tokens=5)
        refused = list(c.events(late))
        assert refused[-1].event == P.EV_ERROR and refused[-1].data["code"] == P.E_SHUTTING_DOWN
        for cid in ids:
            events[cid] += list(streams[cid])
        rc = d.proc.wait(grace + 30)
    elapsed = time.monotonic() - t0
    assert rc == 0, d.log()
    assert elapsed < grace + 5, elapsed  # generous: the daemon itself aims at the grace period
    cut = 0
    for cid in ids:
        last = events[cid][-1]
        assert last.terminal, events[cid]
        streamed = "".join(e.text for e in events[cid] if e.event == P.EV_TOKEN)
        assert last.data["text"] == streamed  # the partial answer, nothing lost or repeated
        if last.event == P.EV_ERROR:
            assert last.data["code"] == P.E_SHUTTING_DOWN
            cut += 1
        else:
            assert last.event == P.EV_DONE
    assert cut >= 2  # with one slot, two of the three were queued when the signal came
    log = d.log()
    assert "event=draining" in log and "event=stopped" in log


def test_sighup_changes_the_quantum_without_losing_requests(tiny_model_dir, serve, tmp_path):
    conf = tmp_path / "quantad.toml"
    conf.write_text('policy = "rr"\nquantum_tokens = 100000\n')
    d = serve("--model", str(tiny_model_dir), "--slots", "1", "--config", str(conf))
    d.notify.wait_for("READY=1")
    with d.client() as c:
        first = c.chat(messages("before the reload"), max_tokens=24)
        assert first.stats["quanta"] == 1 and first.stats["preemptions"] == 0
        long_id = c.submit(messages("a long story"), max_tokens=300)
        long_events = c.events(long_id)
        seen = [next(long_events), next(long_events)]  # accepted, then streaming under the old quantum

        conf.write_text('policy = "rr"\n\n# smaller quantum\nquantum_tokens = 4\n')
        d.proc.send_signal(signal.SIGHUP)
        d.notify.wait_for("RELOADING=1", timeout=30)
        d.notify.wait_for("READY=1", timeout=30)
        assert c.ps()["quantum"]["tokens"] == 4
        short = c.chat(messages("after the reload"), max_tokens=24)
        rest = seen + list(long_events)
        assert rest[-1].event == P.EV_DONE, rest[-1]
        assert short.stats["quanta"] >= short.usage["completion_tokens"] // 4
        assert rest[-1].data["stats"]["preemptions"] >= 1  # the running request yielded under the new quantum

        conf.write_text('policy = "rr"\nquantum_tokens = -3\n')
        d.proc.send_signal(signal.SIGHUP)
        d.notify.wait_for("RELOADING=1", timeout=30)
        d.notify.wait_for("READY=1", timeout=30)
        assert c.ps()["quantum"]["tokens"] == 4  # the bad file was rejected whole
    log = d.log()
    assert "event=config_changed key=quantum_tokens old=100000 new=4" in log
    assert "event=reload_rejected" in log and f"{conf}:2: quantum_tokens: must be positive" in log
    d.proc.send_signal(signal.SIGINT)  # Ctrl-C in a terminal: the same drain as SIGTERM
    d.notify.wait_for("STOPPING=1", timeout=30)
    assert d.proc.wait(60) == 0 and "event=signal signal=SIGINT" in d.log()


def quantad(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scheduler", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=dict(os.environ, **(env or {})))  # fmt: skip


def test_config_errors_name_the_key_and_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('# quantad\npolicy = "rr"\n\nslots = "two"\nquantum_msec = 5\npolicy_x = 1\n')
    out = quantad("config", "check", "--config", str(bad))
    assert out.returncode == 1
    assert f"{bad}:4: slots: not a number: 'two'" in out.stderr
    assert f"{bad}:5: unknown key 'quantum_msec' (did you mean 'quantum_ms'?)" in out.stderr
    served = quantad("serve", "--config", str(bad), "--endpoint", f"ipc://{tmp_path}/a.sock")
    assert served.returncode == 2 and f"{bad}:4: slots" in served.stderr  # before any model is loaded

    choice = tmp_path / "choice.toml"
    choice.write_text('policy = "lottery"\n')
    out = quantad("config", "check", "--config", str(choice))
    assert out.returncode == 1 and f"{choice}:1: policy: 'lottery' is not one of rr, fifo" in out.stderr
    syntax = tmp_path / "syntax.toml"
    syntax.write_text("slots = 2\nquantum_ms = \n")
    out = quantad("config", "check", "--config", str(syntax))
    assert out.returncode == 1 and "invalid TOML" in out.stderr and "line 2" in out.stderr
    out = quantad("config", "check", "--config", str(tmp_path / "none.toml"))
    assert out.returncode == 1 and "cannot read" in out.stderr
    out = quantad("config", "check", env={"QUANTAD_QUANTUM_MS": "fast"})
    assert out.returncode == 1 and "$QUANTAD_QUANTUM_MS: quantum_ms: not a number: 'fast'" in out.stderr


def test_config_show_and_precedence(tmp_path, monkeypatch):
    conf = tmp_path / "q.toml"
    conf.write_text('workers = 2\nslots = 3\nquantum_ms = 50\nhost_budget = "1G"\n')
    out = quantad("config", "show", "--json", "--config", str(conf), env={"QUANTAD_SLOTS": "4"})
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)["options"]
    assert shown["workers"] == {"value": 2, "source": f"file:{conf}:1"}
    assert shown["slots"] == {"value": 4, "source": "env:QUANTAD_SLOTS"}
    assert shown["host_budget"] == {"value": 1 << 30, "source": f"file:{conf}:4"}
    assert shown["policy"] == {"value": "rr", "source": "default"}
    assert shown["max_unread"] == {"value": 10_000, "source": "default (derived)"}  # the value used, not "unset"
    assert shown["state_dir"]["value"] and shown["endpoint"]["value"].startswith("ipc://")
    assert quantad("config", "check", "--config", str(conf)).returncode == 0

    # flag > env > file > default, for every option of the parser (the mapping is generic)
    sp = serve_parser()
    monkeypatch.setenv("QUANTAD_SLOTS", "4")
    monkeypatch.setenv("QUANTAD_QUANTUM_MS", "75")
    eff = C.resolve(sp, C.given_flags(sp, ["--slots", "5"]), conf)
    assert (eff.values.slots, eff.sources["slots"]) == (5, "flag")
    assert (eff.values.quantum_ms, eff.sources["quantum_ms"]) == (75.0, "env:QUANTAD_QUANTUM_MS")
    assert (eff.values.workers, eff.values.device_budget) == (2, 512 << 20)
    for key in C.options(sp):
        assert C.env_name(key) == "QUANTAD_" + key.upper() and hasattr(eff.values, key)


def test_log_lines_kv_json_journald():
    def record(msg: str, *args, level=20, exc=None) -> object:
        import logging

        return logging.LogRecord("quantad", level, __file__, 1, msg, args, exc)

    kv = Formatter("kv").format(record("event=cancelled pid=%s why=%r", 7, "agent gone"))
    assert re.fullmatch(r'ts=\S+Z level=info event=cancelled pid=7 why="agent gone"', kv), kv
    journal = Formatter("kv", journald=True).format(record("event=x pid=%s", 3, level=40))
    assert journal == "<3>level=error event=x pid=3"
    js = json.loads(Formatter("json", static={"worker": "w0"}).format(record("free text %s", "here")))
    assert js["worker"] == "w0" and js["msg"] == "free text here" and js["level"] == "info"
    try:
        raise ValueError("boom")
    except ValueError:
        line = Formatter("kv", journald=True).format(record("event=oops", level=40, exc=sys.exc_info()))
    assert "\n" not in line and line.startswith("<3>") and "ValueError: boom" in line
    assert pairs("event=a b=1 c='x y'") == {"event": "a", "b": 1, "c": "x y"}


def test_systemd_unit_verifies():
    """``systemd-analyze verify`` on the shipped unit (``make test`` installs systemd where missing)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd; `make test` does it)")
    text = UNIT.read_text()
    keys = {m.group(1): m.group(2).strip() for m in re.finditer(r"^(\w+)=(.*)$", text, re.M)}
    wanted = {"Type": "notify", "NotifyAccess": "main", "KillMode": "mixed", "RuntimeDirectory": "quantad",
              "StateDirectory": "quantad", "ProtectSystem": "strict", "NoNewPrivileges": "yes"}  # fmt: skip
    for key, value in wanted.items():
        assert keys.get(key) == value, key
    assert keys["ExecReload"] == """/bin/sh -c 'kill -HUP "$MAINPID"'""" and "WatchdogSec" in keys
    exec_start = keys["ExecStart"].split()[0]
    assert exec_start == "/opt/quantad/venv/bin/quantad"
    # verify checks that ExecStart exists: where quantad is not installed under /opt, verify the same
    # unit with only that path pointing at this environment's own ``quantad`` script
    here = Path(sys.executable).parent / "quantad"
    unit = UNIT
    if not Path(exec_start).exists():
        unit = Path(os.environ.get("TMPDIR", "/tmp")) / f"quantad-verify-{os.getpid()}" / "quantad.service"
        unit.parent.mkdir(parents=True, exist_ok=True)
        unit.write_text(text.replace(exec_start, str(here if here.exists() else sys.executable)))
    out = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), out.stdout + out.stderr


def test_config_keys_follow_the_parser():
    """A flag added to ``serve`` is a TOML key and an environment variable with no other change."""
    sp = serve_parser()
    sp.add_argument("--made-up-option", type=int, default=3)
    sp.add_argument("--made-up-switch", action="store_true")
    os.environ["QUANTAD_MADE_UP_OPTION"] = "9"
    try:
        eff = C.resolve(sp, argparse.Namespace(), None)
    finally:
        del os.environ["QUANTAD_MADE_UP_OPTION"]
    assert eff.values.made_up_option == 9 and eff.values.made_up_switch is False
    example = (REPO / "deploy" / "quantad.toml").read_text()
    for key in C.options(serve_parser()):
        assert re.search(rf"^#? ?{key} = ", example, re.M), f"deploy/quantad.toml lacks {key}"
