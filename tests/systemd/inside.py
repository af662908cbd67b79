"""The checks inside the booted container, as root, run by quantad-check.service at boot.

It installs quantad and its unit as docs/service.md says (the wheel in /opt/quantad/venv, the unit
unchanged in /etc/systemd/system, a static ``quantad`` group with a member, alice), then drives the
service through systemctl as an operator would.  Each check's findings go to OUT/results.json at
once; tests/test_systemd_unit.py asserts on them after the container has powered off.  It waits on
journal lines and on the clients' own output, never on a clock: the timeouts only bound a hang.

Standard library only: it runs on the container's /usr/bin/python3.11, not on the venv under test.
"""

from __future__ import annotations

import json
import os
import queue
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/out")
VENV = Path("/opt/quantad/venv")
QUANTAD = str(VENV / "bin" / "quantad")
CONFIG = Path("/etc/quantad/quantad.toml")
# One thread and one sequence: llama.cpp's output is then the same with or without preemption
# and restarts (README's exactness rule), so a request resumed after a SIGKILL can be compared.
BASE_CONFIG = {"threads": 1, "slots": 1, "quantum_ms": 100}
results: dict[str, dict] = {}


def sh(*cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def alice(*args: str) -> list[str]:
    """``quantad ARGS`` as alice, a member of the static quantad group (not root, not the service's user)."""
    return ["runuser", "-u", "alice", "--", QUANTAD, *args]


def show(*props: str) -> dict[str, str]:
    out = sh("systemctl", "show", "quantad", "-p", ",".join(props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def write_config(**extra: object) -> None:
    lines = [f"{k} = {json.dumps(v)}" for k, v in (BASE_CONFIG | extra).items()]
    CONFIG.write_text("\n".join(lines) + "\n")


def record(name: str, ok: bool, **detail: object) -> None:
    results[name] = {"ok": bool(ok), **detail}
    (OUT / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"check {name}: {'ok' if ok else 'FAILED'} {json.dumps(detail, default=str)[:1500]}", flush=True)


def unit_pids() -> list[int]:
    """Every process in the service's cgroup (the daemon and its workers), on cgroup v2 or a hybrid layout."""
    group = show("ControlGroup")["ControlGroup"].lstrip("/")
    for top in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"):
        procs = Path(top, group, "cgroup.procs")
        if group and procs.exists():
            return [int(p) for p in procs.read_text().split()]
    return []


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}").exists()]


class Journal:
    """``journalctl -u quantad`` followed from a cursor taken now: a line logged after this is never missed."""

    def __init__(self) -> None:
        shown = sh("journalctl", "-n", "1", "-o", "cat", "--show-cursor", "--no-pager").stdout
        cursor = re.search(r"-- cursor: (\S+)", shown)
        after = [f"--after-cursor={cursor.group(1)}"] if cursor else []
        cmd = ["journalctl", "-u", "quantad", "-f", "-o", "cat", "--no-pager", *after]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> str | None:
        """The first line from the cursor on matching PATTERN (None after TIMEOUT: a hang)."""
        for line in self.seen:
            if re.search(pattern, line):
                return line
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        return None

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Run:
    """``quantad run PROMPT`` as alice in the background, its answer streamed to a pipe."""

    def __init__(self, prompt: str, max_tokens: int) -> None:
        cmd = alice("run", "--max-tokens", str(max_tokens), prompt)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.head = b""

    def started(self, timeout: float = 120) -> bool:
        """True once the first text arrived: the request is running on a worker."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if ready:
            self.head = os.read(self.proc.stdout.fileno(), 1)
        return bool(self.head)

    def finish(self, timeout: float = 180) -> dict:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return {"rc": self.proc.returncode, "text": (self.head + out).decode().strip(), "stderr": err.decode()[-800:]}


def answer(prompt: str, max_tokens: int = 48) -> dict:
    r = sh(*alice("run", "--max-tokens", str(max_tokens), prompt))
    return {"rc": r.returncode, "text": r.stdout.strip(), "stderr": r.stderr[-800:]}


def workers() -> list[dict]:
    r = sh(*alice("workers", "--json"))
    return json.loads(r.stdout)["workers"] if r.returncode == 0 else []


def setup() -> None:
    wheel = sorted((OUT / "wheel").glob("quantad-*.whl"))
    pip = sh(str(VENV / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", *map(str, wheel))
    Path("/opt/quantad/docs").mkdir(parents=True, exist_ok=True)
    shutil.copy(OUT / "service.md", "/opt/quantad/docs/service.md")
    group = sh("groupadd", "--system", "quantad")
    user = sh("useradd", "--create-home", "--groups", "quantad", "alice")
    shutil.copy(OUT / "quantad.service", "/etc/systemd/system/quantad.service")
    reload = sh("systemctl", "daemon-reload")
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    write_config()
    check = sh(QUANTAD, "config", "check", "--config", str(CONFIG))
    verify = sh("systemd-analyze", "verify", "/etc/systemd/system/quantad.service")
    steps = {"pip": pip, "groupadd": group, "useradd": user, "daemon-reload": reload, "config check": check}
    record(
        "install",
        all(r.returncode == 0 for r in steps.values()),
        **{k: [r.returncode, (r.stdout + r.stderr)[-600:]] for k, r in steps.items()},
        verify=[verify.returncode, verify.stderr[-600:]],
    )


def check_start() -> None:
    t0 = time.monotonic()
    start = sh("systemctl", "start", "quantad", timeout=700)  # Type=notify: returns at READY=1
    seconds = round(time.monotonic() - t0, 1)
    state = show("ActiveState", "SubState", "StatusText", "MainPID", "Type", "User", "Group")
    status = sh("systemctl", "status", "quantad", "--no-pager", "-l").stdout
    status_line = next((ln.strip() for ln in status.splitlines() if ln.strip().startswith("Status:")), "")
    ok = (
        start.returncode == 0
        and (state["ActiveState"], state["SubState"]) == ("active", "running")
        and state["StatusText"].startswith("serving:")
        and status_line == f'Status: "{state["StatusText"]}"'
    )
    record(
        "start",
        ok,
        rc=start.returncode,
        stderr=start.stderr[-800:],
        seconds=seconds,
        show=state,
        status_line=status_line,
    )


def check_answer(backend: str) -> None:
    got = answer("What is the capital of France?")
    ws = workers()
    backends = sorted({w.get("backend") for w in ws})
    socket = Path("/run/quantad/agents.sock")
    mode = oct(socket.stat().st_mode & 0o777) if socket.exists() else None
    ok = got["rc"] == 0 and got["text"] and backends == [backend] and all(w.get("state") == "up" for w in ws)
    record(f"answer_{backend}", ok, **got, backends=backends, socket_mode=mode, workers=ws)


def check_answer_llamacpp() -> None:
    check_answer("llamacpp")


def check_reload() -> None:
    journal = Journal()
    run = Run("Write a long story about a dragon who learns to fly.", 160)
    started = run.started()
    # quantum_ms applies live; journal_keep_s waits for a restart (a warning says so).
    write_config(quantum_ms=40, journal_keep_s=600)
    reload = sh("systemctl", "reload", "quantad")
    reloaded = journal.wait_for(r"event=reloaded", 60)
    warned = journal.wait_for(r"event=config_changed key=journal_keep_s .*needs_restart", 5)
    top = sh(QUANTAD, "top", "--json")
    quantum = json.loads(top.stdout)["stats"]["quantum"] if top.returncode == 0 else None
    done = run.finish()
    journal.close()
    ok = started and reload.returncode == 0 and reloaded and quantum == {"tokens": None, "ms": 40.0}
    ok = ok and done["rc"] == 0 and len(done["text"]) > 100 and bool(warned)
    record("reload", ok, reloaded=reloaded, warned=warned, quantum=quantum, run=done, state=show("ActiveState"))


def check_stop_under_load() -> None:
    runs = [Run(f"Tell me about the number {i}.", 96) for i in range(3)]
    started = all(r.started() for r in runs)  # each has its first text: accepted, and taking turns
    journal = Journal()
    t0 = time.monotonic()
    stop = sh("systemctl", "stop", "quantad", timeout=120)
    seconds = round(time.monotonic() - t0, 1)
    state = show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "TimeoutStopUSec")
    draining = journal.wait_for(r"event=draining", 5)
    journal.close()
    clients = [r.finish(90) for r in runs]
    ok = started and stop.returncode == 0 and seconds < 45 and bool(draining)
    ok = ok and (state["ActiveState"], state["Result"], state["ExecMainStatus"]) == ("inactive", "success", "0")
    # The running one finishes within the grace period; the queued ones (round robin: any two of
    # the three) are answered at once, `shutting_down` with the text they had: no client is left.
    running = int(re.search(r"running=(\d+)", draining or "running=-1").group(1))
    finished = [c for c in clients if c["rc"] == 0 and c["text"]]
    cut = [c for c in clients if c["rc"] == 2 and "shutting_down" in c["stderr"]]
    ok = ok and running == 1 and len(finished) == 1 and len(cut) == 2
    record("stop_under_load", ok, seconds=seconds, show=state, draining=draining, clients=clients)


def check_watchdog() -> None:
    start = sh("systemctl", "start", "quantad", timeout=700)
    before = show("MainPID", "NRestarts")
    main = int(before["MainPID"])
    old = unit_pids()
    journal = Journal()
    t0 = time.monotonic()
    os.kill(main, signal.SIGSTOP)  # the scheduler loop stops: no more WATCHDOG=1
    timeout = journal.wait_for(r"Watchdog timeout", 120)
    restarted = journal.wait_for(r"Started quantad\.service", 300)
    seconds = round(time.monotonic() - t0, 1)
    after = show("MainPID", "NRestarts", "ActiveState", "SubState")
    journal.close()
    ok = start.returncode == 0 and timeout and restarted and after["MainPID"] != str(main)
    ok = ok and int(after["NRestarts"]) == int(before["NRestarts"]) + 1 and len(old) >= 2 and not alive(old)
    ok = ok and (after["ActiveState"], after["SubState"]) == ("active", "running")
    record(
        "watchdog",
        ok,
        timeout=timeout,
        restarted=restarted,
        seconds=seconds,
        before=before,
        after=after,
        old_pids=old,
        old_alive=alive(old),
        lines=journal.seen[-30:],
    )


def check_sigkill() -> None:
    prompts = ["Describe the sea in a few sentences.", "Describe a mountain in a few sentences."]
    reference = [answer(p, 80)["text"] for p in prompts]  # uninterrupted
    runs = [Run(p, 80) for p in prompts]
    # Both accepted (journaled) before the kill: a client that has never reached a daemon fails at once.
    started = all(r.started() for r in runs)
    old = unit_pids()
    main = show("MainPID")["MainPID"]
    journal = Journal()
    kill = sh("systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", "quantad")
    died = journal.wait_for(r"Main process exited, code=killed", 60)
    # Scheduled only once the unit's cgroup is empty: every worker has gone by then.
    scheduled = journal.wait_for(r"Scheduled restart job", 120)
    left = alive([p for p in old if str(p) != main])
    restarted = journal.wait_for(r"Started quantad\.service", 300)
    recovered = journal.wait_for(r"event=recovered", 30)
    clients = [r.finish(300) for r in runs]
    journal.close()
    same = [c["text"] == ref for c, ref in zip(clients, reference, strict=True)]
    ok = started and kill.returncode == 0 and died and scheduled and len(old) >= 2 and not left
    ok = ok and restarted and recovered
    ok = ok and all(c["rc"] == 0 for c in clients) and all(same)
    killed = [ln for ln in journal.seen if "Killing process" in ln]
    record(
        "sigkill",
        ok,
        died=died,
        scheduled=scheduled,
        workers_left=left,
        old_pids=old,
        recovered=recovered,
        same_as_uninterrupted=same,
        clients=clients,
        reference=reference,
        killed_by_systemd=killed,
    )


def check_hf() -> None:
    write_config(backend="hf")
    t0 = time.monotonic()
    restart = sh("systemctl", "restart", "quantad", timeout=900)
    seconds = round(time.monotonic() - t0, 1)
    cache = sorted(str(p.relative_to("/var/cache/quantad")) for p in Path("/var/cache/quantad").glob("*/*"))[:10]
    record(
        "restart_hf",
        restart.returncode == 0,
        rc=restart.returncode,
        stderr=restart.stderr[-800:],
        seconds=seconds,
        cache=cache,
    )
    check_answer("hf")


def check_journal() -> None:
    r = sh("journalctl", "-u", "quantad", "-o", "json", "--no-pager")
    entries = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    ours = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "quantad" and isinstance(e.get("MESSAGE"), str)]
    priorities = Counter(e.get("PRIORITY") for e in ours)
    sample = {p: next(e["MESSAGE"] for e in ours if e.get("PRIORITY") == p)[:300] for p in priorities}
    raw = [e["MESSAGE"][:200] for e in ours if re.match(r"<\d>|ts=", e["MESSAGE"])][:5]
    ok = priorities["6"] > 0 and any(p in priorities for p in ("0", "1", "2", "3", "4")) and not raw
    record("journal", ok, priorities=dict(priorities), sample=sample, unparsed=raw, lines=len(ours))


def main() -> None:
    try:
        setup()
        checks = (
            check_start,
            check_answer_llamacpp,
            check_reload,
            check_stop_under_load,
            check_watchdog,
            check_sigkill,
            check_hf,
            check_journal,
        )
        for check in checks:
            try:
                check()
            except Exception:
                record(check.__name__, False, error=traceback.format_exc()[-2000:])
    finally:
        sh("systemctl", "stop", "quantad", timeout=120)
        record("finished", True)


if __name__ == "__main__":
    main()
