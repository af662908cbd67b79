"""Nothing lost when the daemon dies: the journal, recovery at start, and clients that resume.

Real daemons, real workers, real SIGKILLs: a daemon is killed mid-stream, a new one starts on the
same state directory, and every client's assembled text equals an uncrashed greedy run's.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import psutil
import pytest

from ipc import protocol as P
from ipc.client import AsyncClient, Client, ClientError, result_of
from scheduler.journal import CRASH_AFTER
from tests.conftest import PROMPTS, REPO, messages

FLAGS = ("--slots", "2", "--quantum-tokens", "2", "--journal-keep-s", "600")


def _params(i: int) -> dict:
    return {"max_tokens": 24 + 6 * i, "min_tokens": 24 + 6 * i, "temperature": 0.0}


def _open_rows(state_dir) -> int:
    db = sqlite3.connect(state_dir / "journal.db")
    try:
        return db.execute("SELECT count(*) FROM requests WHERE ended_at IS NULL").fetchone()[0]
    finally:
        db.close()


async def _follow(c: AsyncClient, i: int, out: dict, progress: asyncio.Event) -> None:
    """One agent: submit, assemble the text from token events (each index once), keep the done event."""
    cid = await c.submit(messages(PROMPTS[i % len(PROMPTS)]), **_params(i))
    text, last = "", 0
    async for ev in c.events(cid):
        if ev.event == P.EV_TOKEN:
            assert ev.data["index"] > last, "a token came twice"
            last = ev.data["index"]
            text += ev.text
            if last >= 6:
                progress.set()
        elif ev.terminal:
            out[i] = (ev.event, text, ev.data.get("text") if ev.event == P.EV_DONE else ev.data, last)


def _reference(d, n: int) -> list[str]:
    with d.client(timeout=300) as c:
        return [c.chat(messages(PROMPTS[i % len(PROMPTS)]), **_params(i)).text for i in range(n)]


def _restart(d) -> None:
    """A new daemon on the dead one's state directory, runtime directory and endpoint."""
    d.daemon.start()
    d.proc = d.daemon.proc


@pytest.mark.parametrize(
    "engine,tier", [("hf", "auto"), ("hf", "device"), ("hf", "host"), ("hf", "disk"), ("hf", "recompute"),
                    ("llamacpp", "disk")]
)  # fmt: skip
def test_a_killed_daemon_finishes_every_request_after_a_restart(tiny_model_dir, start_daemon, engine, tier):
    n = 4
    flags = (*FLAGS, "--snapshot-tier", tier, "--disk-budget", "64MiB")
    if engine == "llamacpp":  # one slot, one thread: llama.cpp's output is then exact (tests/test_llamacpp_engine.py)
        pytest.importorskip("llama_cpp")
        from backends.model_store import default_gguf

        d = start_daemon(default_gguf(), *flags, "--backend", "llamacpp", "--threads", "1", "--slots", "1")
    else:
        d = start_daemon(tiny_model_dir, *flags)
    want = _reference(d, n)
    workers = psutil.Process(d.proc.pid).children(recursive=True)

    async def go() -> dict:
        out: dict = {}
        progress = asyncio.Event()
        async with AsyncClient(d.endpoint, dead_after_s=120) as c:
            tasks = [asyncio.create_task(_follow(c, i, out, progress)) for i in range(n)]
            await progress.wait()  # streaming, with others queued and preempted (2 slots, 2-token quanta)
            os.kill(d.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(d.proc.wait)
            gone, alive = await asyncio.to_thread(psutil.wait_procs, workers, 20)
            assert not alive, "a worker outlived its daemon"
            await asyncio.to_thread(_restart, d)
            await asyncio.gather(*tasks)
        return out

    out = asyncio.run(go())
    assert "event=recovered" in d.log()
    if tier == "disk":  # the preempted ones resume from the files their dead worker left
        assert "event=adopt " in d.log() and "adopted its context file" in d.log()
    for i in range(n):
        event, streamed, final, last = out[i]
        assert event == P.EV_DONE, final
        assert streamed == final == want[i], f"request {i}"
        assert last == _params(i)["max_tokens"]
    assert d.daemon.stop(cut=False) == 0
    assert _open_rows(d.state_dir) == 0


def test_attach_shows_a_request_from_another_terminal(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, *FLAGS)
    with d.client(timeout=300) as c:
        cid = c.submit(messages(PROMPTS[0]), stream=True, **_params(3))
        events = c.events(cid)
        pid = next(events).data["pid"]
        run = subprocess.run([sys.executable, "-m", "console", "run", "--attach", str(pid), "--endpoint",
                              d.endpoint, "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
        final = [ev for ev in events if ev.terminal][-1]
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert shown["pid"] == pid and shown["text"] == final.data["text"]
    # ended: the journal still has it, for a while
    again = subprocess.run([sys.executable, "-m", "console", "run", "--attach", str(pid), "--endpoint",
                            d.endpoint], cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert again.returncode == 0 and final.data["text"] in again.stdout
    with d.client(timeout=30) as c:
        with pytest.raises(ClientError, match="not_found"):
            result_of(list(c.attach(10_000)))


def test_a_handover_stop_leaves_requests_for_the_next_daemon(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, *FLAGS, "--on-stop", "handover")
    want = _reference(d, 2)
    with Client(d.endpoint, dead_after_s=120) as c:
        ids = [c.submit(messages(PROMPTS[i]), stream=True, **_params(i)) for i in range(2)]
        events = c.events(ids[0])
        assert next(events).event == P.EV_ACCEPTED and next(events).event == P.EV_TOKEN
        assert d.daemon.stop(cut=False) == 0  # SIGTERM: hands over at once
        assert _open_rows(d.state_dir) == 2
        _restart(d)
        texts = []
        for cid in ids:
            evs = list(c.events(cid))
            assert evs[-1].event == P.EV_DONE, evs[-1].data
            texts.append(evs[-1].data["text"])
    assert texts == want


@pytest.mark.parametrize("commit", range(1, 9))
def test_a_kill_at_each_journal_commit_loses_nothing_acknowledged(tiny_model_dir, start_daemon, commit):
    """Torn writes: the daemon SIGKILLs itself right after its N-th commit; a restart recovers what it had."""
    d = start_daemon(tiny_model_dir, *FLAGS)
    want = _reference(d, 2)
    d.daemon.stop(cut=False)
    d.daemon.env[CRASH_AFTER] = str(commit)  # counted by each daemon process from its start
    _restart(d)
    del d.daemon.env[CRASH_AFTER]
    crashed = d.proc

    def restart_after_the_crash() -> None:
        if crashed.wait() == -signal.SIGKILL:
            _restart(d)

    watcher = threading.Thread(target=restart_after_the_crash)
    watcher.start()
    with Client(d.endpoint, dead_after_s=120) as c:
        ids = [c.submit(messages(PROMPTS[i]), stream=True, **_params(i)) for i in range(2)]
        got = []
        for cid in ids:
            text = ""
            for ev in c.events(cid):
                if ev.event == P.EV_TOKEN:
                    text += ev.text
                elif ev.terminal:
                    assert ev.event == P.EV_DONE, ev.data
                    got.append((text, ev.data["text"]))
    assert crashed.returncode == -signal.SIGKILL  # it did die at that commit
    watcher.join()
    assert got == [(w, w) for w in want]


def test_a_soak_of_random_kills_loses_no_request_and_no_token(tiny_model_dir, tmp_path):
    """200 requests from 4 agents; the daemon SIGKILLed at 30 random moments (at least), restarted each time."""
    from benchmarks.crash_soak import soak

    s = soak(str(tiny_model_dir), str(tmp_path), requests=200, kills=30, tokens=16)
    assert s.kills >= 30
    assert s.wrong == [] and s.done == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sse_lines(resp) -> Iterator[str]:
    """The lines of an SSE response until it ends, or the connection drops."""
    try:
        for raw in resp:
            yield raw.decode().rstrip("\r\n")
    except (http.client.HTTPException, OSError):
        return


def test_an_http_stream_cut_by_a_daemon_kill_resumes_from_its_last_event_id(tiny_model_dir, start_daemon):
    port = _free_port()
    d = start_daemon(tiny_model_dir, *FLAGS, "--http", f"127.0.0.1:{port}")
    (want,) = _reference(d, 1)
    url = f"http://127.0.0.1:{port}/v1"
    body = {"model": tiny_model_dir.name, "messages": messages(PROMPTS[0]), "stream": True, **_params(0)}
    post = urllib.request.Request(f"{url}/chat/completions", json.dumps(body).encode(),
                                  {"Content-Type": "application/json"})  # fmt: skip
    text, last_id, pending = "", None, None
    with urllib.request.urlopen(post, timeout=120) as r:
        pid = int(r.headers["x-quantad-pid"])
        for line in _sse_lines(r):
            if line.startswith("id: "):
                pending = line[4:]
            elif line.startswith("data: {"):  # the event is whole: its id is what we have
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                last_id = pending
                if len(text) > 20 and d.proc.poll() is None:
                    os.kill(d.proc.pid, signal.SIGKILL)  # mid-stream: the connection drops
    assert text != want
    d.proc.wait()
    _restart(d)
    rest, done = "", False
    get = urllib.request.Request(f"{url}/quantad/requests/{pid}/stream", headers={"Last-Event-ID": last_id})
    with urllib.request.urlopen(get, timeout=120) as r:
        for line in _sse_lines(r):
            if line.startswith("data: {"):
                rest += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            done = done or line == "data: [DONE]"
    assert done and text + rest == want
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{url}/quantad/requests/999/stream", timeout=30)
    assert missing.value.code == 404


def test_a_streamed_n_cut_by_a_daemon_kill_resumes_choice_by_choice(tiny_model_dir, start_daemon):
    """Each choice's chunks carry its own request's id: every choice resumes from its last one, with its index."""
    port = _free_port()
    d = start_daemon(tiny_model_dir, *FLAGS, "--http", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/v1"
    body = {"model": tiny_model_dir.name, "messages": messages(PROMPTS[1]), "n": 2, **_params(1)}

    def post(extra: dict):
        req = urllib.request.Request(f"{url}/chat/completions", json.dumps(body | extra).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        return urllib.request.urlopen(req, timeout=120)

    with post({}) as r:
        want = [c["message"]["content"] for c in json.loads(r.read())["choices"]]
    text, last = ["", ""], [None, None]
    with post({"stream": True}) as r:
        pids = [int(p) for p in r.headers["x-quantad-pid"].split(",")]
        pending = None
        for line in _sse_lines(r):
            if line.startswith("id: "):
                pending = line[4:]
            elif line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                i = choice["index"]
                text[i] += choice["delta"].get("content") or ""
                last[i] = pending
                assert pending.startswith(f"{pids[i]}.")
                if min(len(t) for t in text) > 10 and d.proc.poll() is None:
                    os.kill(d.proc.pid, signal.SIGKILL)
    assert text != want
    d.proc.wait()
    _restart(d)
    for i, pid in enumerate(pids):
        rest, done = "", False
        get = urllib.request.Request(
            f"{url}/quantad/requests/{pid}/stream?index={i}", headers={"Last-Event-ID": last[i]}
        )
        with urllib.request.urlopen(get, timeout=120) as r:
            for line in _sse_lines(r):
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    assert choice["index"] == i
                    rest += choice["delta"].get("content") or ""
                done = done or line == "data: [DONE]"
        assert done and text[i] + rest == want[i]
