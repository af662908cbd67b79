"""deploy/quantad.service started by a real systemd: a Debian root booted with ``systemd-nspawn --boot``.

The root (tests/systemd/build-root.sh, built by ``make systemd-test`` and CI) holds systemd and
quantad's dependencies in /opt/quantad/venv; this test builds the working tree's wheel, boots the
root on a throw-away overlay (``--volatile=overlay``: the cached root is never written), and
tests/systemd/inside.py installs the wheel and the unit unchanged and drives the service from
inside (start, answers from a llama.cpp and an HF worker, reload, stop under load, the watchdog,
a SIGKILL, the journal).  Its findings come back in results.json; each is asserted here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOT = Path(os.environ.get("QUANTAD_SYSTEMD_ROOT", REPO / ".venv" / "systemd-root"))
MACHINE = "quantad-systemd-test"
CHECKS = (
    "install",
    "start",
    "answer_llamacpp",
    "reload",
    "stop_under_load",
    "watchdog",
    "sigkill",
    "restart_hf",
    "answer_hf",
    "journal",
    "finished",
)


def _why_not() -> str | None:
    if not sys.platform.startswith("linux"):
        return "systemd-nspawn runs on Linux only"
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    if not shutil.which("systemd-nspawn"):
        return "no systemd-nspawn (Debian's systemd-container; `make systemd-test` installs it)"
    if not (ROOT / ".quantad-root-key").exists():
        return f"no root file system at {ROOT}: `make systemd-test` builds it (root only, ~1.5 minutes)"
    return None


WHY_NOT = _why_not()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]


def _wheel(out: Path) -> None:
    """The working tree's wheel (tracked and untracked files alike, as a user's checkout would build)."""
    src = out / "src"
    skip = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build", ".*_cache")
    shutil.copytree(REPO, src, ignore=skip)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*cmd, "-w", str(out / "wheel"), str(src)], check=True, capture_output=True)
    shutil.rmtree(src)


def _mounts() -> list[str]:
    table = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line for line in table if str(ROOT) in line or MACHINE in line]


def _container_processes() -> list[str]:
    """Processes still running the container's quantad (its pid namespace should have taken them all)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"/opt/quantad/venv" in cmdline:
            found.append(f"{proc.name}: {cmdline.replace(bytes(1), b' ').decode(errors='replace')[:200]}")
    return found


def _boot(out: Path, timeout: float) -> int:
    """Boot the root until inside.py powers it off; a hang past TIMEOUT is shut down, then killed."""
    cmd = ["systemd-nspawn", "--quiet", "-D", str(ROOT), f"--machine={MACHINE}", "--register=no", "--keep-unit"]
    cmd += ["--volatile=overlay", f"--bind={out}:/out", "--boot"]
    with open(out / "console.log", "wb") as console:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return -1


@pytest.mark.timeout(1800)
def test_unit_under_a_real_systemd(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _wheel(out)
    for f in ("tests/systemd/inside.py", "deploy/quantad.service", "docs/service.md"):
        shutil.copy(REPO / f, out)
    mounts_before, processes_before = _mounts(), set(_container_processes())  # a host's own /opt/quantad aside
    key_before = (ROOT / ".quantad-root-key").read_text()
    rc = _boot(out, timeout=1500)
    console = (out / "console.log").read_text(errors="replace")
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    shown = json.dumps(results, indent=1)[-20000:] + "\n--- console (tail) ---\n" + console[-6000:]
    # Cleaned up: the container powered itself off, left no mount or process, and the cached root is untouched.
    assert rc == 0, f"systemd-nspawn exited {rc}\n{shown}"
    assert _mounts() == mounts_before
    assert not set(_container_processes()) - processes_before
    assert not Path(f"/run/systemd/nspawn/propagate/{MACHINE}").exists() or not any(
        Path(f"/run/systemd/nspawn/propagate/{MACHINE}").iterdir()
    )
    assert (ROOT / ".quantad-root-key").read_text() == key_before
    failed = [name for name in CHECKS if not results.get(name, {}).get("ok")]
    assert not failed, f"failed under systemd: {failed}\n{shown}"
    # The figures the closing note quotes.
    print(json.dumps({k: results[k].get("seconds") for k in ("start", "stop_under_load", "watchdog", "restart_hf")}))
