"""A client never hangs forever on a dead daemon: it pings through silence and reports a clear error."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from ipc.client import AsyncClient, Client, DaemonGone
from tests.conftest import REPO, messages


def test_a_waiting_client_reports_a_killed_daemon(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir)
    with Client(d.endpoint, timeout=None, dead_after_s=2) as c:
        cid = c.submit(messages("a long one"), max_tokens=2000, min_tokens=2000, temperature=0.0)
        events = c.events(cid)
        assert next(events).event == "accepted" and next(events).event == "token"
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        with pytest.raises(DaemonGone, match="answered nothing for 2 s"):
            for _ in events:
                pass


def test_quantad_run_exits_when_its_daemon_dies(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir)
    env = dict(os.environ, QUANTAD_DEAD_AFTER_S="2")
    run = subprocess.Popen([sys.executable, "-m", "console", "run", "a long story", "--max-tokens", "2000",
                            "--endpoint", d.endpoint], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert run.stdout.read(1)  # it streams
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    _, err = run.communicate(timeout=60)
    assert run.returncode == 3 and "answered nothing" in err


def test_an_async_client_reports_a_killed_daemon(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir)

    async def go():
        async with AsyncClient(d.endpoint, timeout=None, dead_after_s=2) as c:
            cid = await c.submit(messages("a long one"), max_tokens=2000, min_tokens=2000, temperature=0.0)
            events = c.events(cid)
            assert (await events.__anext__()).event == "accepted"
            assert (await events.__anext__()).event == "token"
            os.kill(d.proc.pid, signal.SIGKILL)
            d.proc.wait()
            with pytest.raises(DaemonGone):
                async for _ in events:
                    pass

    asyncio.run(go())
