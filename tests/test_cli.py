"""The ``quantad`` command as a user runs it: run, ps, kill, errors, and the dependency rules."""

import json
import subprocess
import sys

from tests.conftest import REPO


def quantad(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "console", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)  # fmt: skip


def test_run_json_ps_kill(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--quantum-tokens", "2")
    ep = ["--endpoint", d.endpoint]
    out = quantad("run", "hello there", "--max-tokens", "12", "--seed", "3", "--temperature", "0.7", "--json", *ep)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["usage"]["completion_tokens"] <= 12 and result["finish_reason"] in ("length", "stop")
    for key in ("quanta", "preemptions", "wait_s", "run_s", "context_switch_s", "prompt_tokens_computed"):
        assert key in result["stats"]
    streamed = quantad("run", "hello there", "--max-tokens", "12", "--seed", "3", "--temperature", "0.7", *ep)
    assert streamed.stdout.rstrip("\n") == result["text"]

    with d.client() as c:
        cid = c.submit("a very long answer please", max_tokens=2000)
        it = c.events(cid)
        pid = next(it).data["pid"]
        next(it)
        table = json.loads(quantad("ps", "--json", *ep).stdout)
        row = next(r for r in table["requests"] if r["pid"] == pid)
        assert row["state"] in ("RUNNING", "READY") and row["tokens"] >= 1
        text = quantad("ps", *ep).stdout
        assert text.splitlines()[0].split()[:3] == ["PID", "AGENT", "STATE"] and str(pid) in text
        killed = quantad("kill", str(pid), *ep)
        assert killed.returncode == 0 and f"killed {pid}" in killed.stdout
        assert list(it)[-1].event == "cancelled"
    missing = quantad("kill", "424242", *ep)
    assert missing.returncode == 2 and "not_found" in missing.stderr


def test_run_without_daemon_says_so(tmp_path):
    out = quantad("run", "hi", "--endpoint", f"ipc://{tmp_path}/none.sock", timeout=60)
    assert out.returncode == 3 and "is 'quantad serve' running?" in out.stderr


def test_serve_with_bad_model_fails_clearly(tmp_path):
    out = quantad("serve", "--model", str(tmp_path / "nope"), "--endpoint", f"ipc://{tmp_path}/a.sock")
    assert out.returncode != 0 and "nope" in out.stderr


def test_daemon_and_ipc_never_import_torch_or_backends():
    code = (
        "import sys, console.cli, scheduler.launch, scheduler.daemon, ipc.client, ipc.launcher;"
        "import http_front.server, scheduler.metrics, console.top;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'backends', 'contexts')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout
