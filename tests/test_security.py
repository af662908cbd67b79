"""Who may submit and see what: worker authentication, agent identity and ownership, input hygiene.

Real daemons and workers on the tiny model, real sockets.  The other identity on ``ipc://`` is a
real other Unix uid: a forked child of the test that drops to ``nobody`` before it connects.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from ipc import messages as M
from ipc import protocol as P
from ipc.client import Client, ClientError
from ipc.endpoints import worker_endpoint
from ipc.launcher import DaemonProcess
from tests.conftest import REPO, messages
from tests.test_cli import quantad

NOBODY = 65534


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def greedy(c: Client, prompt: str, n: int = 6, **kw) -> object:
    return c.chat(messages(prompt), max_tokens=n, min_tokens=n, temperature=0.0, **kw)


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_impostor_worker_gets_nothing_and_changes_nothing(transport, tiny_model_dir, start_daemon, tmp_path):
    args = ("--endpoint", f"tcp://127.0.0.1:{free_port()}") if transport == "tcp" else ()
    d = start_daemon(tiny_model_dir, *args)
    d.wait_ready()
    ctx = zmq.Context()
    impostors = []
    for mech in ("null", "plain"):  # no credentials; the right name with a guessed secret
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.identity = b"w0"
        if mech == "plain":
            s.plain_username, s.plain_password = b"w0", b"guess"
        s.connect(worker_endpoint(d.endpoint))
        with contextlib.suppress(zmq.Again):  # a refused handshake can drop the pipe first: never block
            s.send(P.pack(M.Ready(worker="w0", slots=4).encode()), zmq.DONTWAIT)
        impostors.append(s)
    try:
        with d.client(timeout=120) as c:
            before = greedy(c, "the secret prompt")
            after = greedy(c, "the secret prompt")
            assert before.text == after.text and before.usage["completion_tokens"] == 6
            assert [w["name"] for w in c.ps()["workers"]] == ["w0"]
        for s in impostors:
            assert s.poll(200) == 0  # not one message: no run, no prompt
    finally:
        ctx.destroy(0)
    assert "connection_refused" in d.log()


def test_validation_crashes_answer_bad_field_with_the_id(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir)
    with d.client(timeout=60) as c:
        schema_not_a_map = {"response_format": {"type": "json_schema", "json_schema": "x"}}
        for bad in (schema_not_a_map, {"tool_choice": {"function": "x"}}):
            with pytest.raises(ClientError) as err:
                c.chat(messages("hi"), max_tokens=2, **bad)
            assert err.value.code == "bad_field"
        assert c.ping()["pong"]


def test_oversized_input_is_quoted_short(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(d.endpoint)
    try:
        s.send(msgpack.packb({"v": 1, "op": "x" * (1 << 20), "id": 1}))
        reply = msgpack.unpackb(s.recv())
        assert reply["code"] in ("unknown_op", "too_large") and len(reply["message"]) < 1000
    finally:
        ctx.destroy(0)
    assert max(len(line) for line in d.log().splitlines()) < 2000


def test_a_writable_socket_directory_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    out = quantad("serve", "--model", "smollm2", "--endpoint", f"ipc://{shared}/a.sock", timeout=60)
    assert out.returncode != 0 and "refusing the socket directory" in out.stderr


# ---- two identities: this uid (the daemon's: admin) and nobody -----------------------------------
class Nobody:
    """``job`` in a forked child that became uid nobody first (modules are loaded: no file access needed).

    What the job tells (``arg["tell"]``) and what it returns come back, in order, from ``recv``.
    """

    def __init__(self, endpoint: str, job: str, arg: dict):
        mp = multiprocessing.get_context("fork")
        self.pipe, child = mp.Pipe()
        self.proc = mp.Process(target=_nobody_main, args=(child, endpoint, job, arg))
        self.proc.start()

    def recv(self) -> dict:
        return self.pipe.recv() if self.pipe.poll(120) else {"error": "timeout"}

    def __enter__(self) -> Nobody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.join(30)


def as_nobody(endpoint: str, job: str, arg: dict) -> dict:
    with Nobody(endpoint, job, arg) as nobody:
        return nobody.recv()


def _nobody_main(pipe, endpoint: str, job: str, arg: dict) -> None:
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        with Client(endpoint, agent="b", timeout=60) as c:
            pipe.send(JOBS[job](c, arg | {"tell": pipe.send}))
    except Exception as exc:  # the parent asserts on it
        pipe.send({"error": repr(exc)})


def _nobody_probe(c: Client, arg: dict) -> dict:
    out: dict = {"ps": [r["pid"] for r in c.ps()["requests"]]}
    for op, call in (("kill", lambda: c.kill(arg["pid"])), ("nice", lambda: c.nice(arg["pid"], 10))):
        try:
            call()
            out[op] = "done"
        except ClientError as exc:
            out[op] = exc.code
    r = greedy(c, arg["prompt"], session=arg["session"])
    out["reused"] = r.stats["prompt_tokens_reused"]
    out["owner"] = r.stats.get("owner")
    return out


def _nobody_hold(c: Client, arg: dict) -> dict:
    cid = c.submit(messages("nobody's long one"), max_tokens=400, min_tokens=400, temperature=0.0)
    arg["tell"]({"pid": c.recv(cid)["pid"]})  # accepted: the admin may look for it now
    return {"end": [ev.event for ev in c.events(cid)][-1]}


def _nobody_flood(c: Client, arg: dict) -> dict:
    """Submit ``n`` chats at once; report each one's first answer (accepted, or the error's code)."""
    cids = [c.submit(messages(f"flood {i}"), max_tokens=arg["tokens"], temperature=0.0) for i in range(arg["n"])]
    first = []
    for cid in cids:
        msg = c.recv(cid)
        first.append(msg["event"] if msg["event"] != "error" else msg["code"])
    c.call("ping")
    return {"first": first}


JOBS = {"probe": _nobody_probe, "hold": _nobody_hold, "flood": _nobody_flood}


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another uid")
@pytest.mark.parametrize("policy", ["rr", "fair"])
def test_quotas_refuse_a_flood_and_a_polite_identity_is_served(policy, open_daemons):
    d = open_daemons("--policy", policy, "--requests-per-identity", "4", "--tokens-per-identity", "100000")
    with Nobody(d.endpoint, "flood", {"n": 12, "tokens": 40}) as nobody, d.client(timeout=120) as c:
        flood = nobody.recv()
        polite = greedy(c, "a polite question")  # while the flood's four run
        assert polite.usage["completion_tokens"] == 6
        refused = c.call("stats")["refused"]
    assert flood.get("first") == ["accepted"] * 4 + ["quota_exceeded"] * 8, flood
    assert refused["quota_exceeded"] == 8


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another uid")
def test_token_quota_counts_max_tokens(open_daemons):
    d = open_daemons("--tokens-per-identity", "300")
    out = as_nobody(d.endpoint, "flood", {"n": 2, "tokens": 200})
    assert out.get("first") == ["accepted", "quota_exceeded"], out


def test_a_connection_over_its_rate_is_refused_and_served_again(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--rate-limit", "1", "--rate-burst", "5")
    d.wait_ready()
    with d.client(timeout=10) as c:
        cids = [c.send({"op": "ping"}) for _ in range(10)]
        codes = [c.recv(cid).get("code", "ok") for cid in cids]
    assert codes[:5] == ["ok"] * 5 and "rate_limited" in codes[5:]
    with d.client(timeout=10) as other:  # another connection has a bucket of its own
        assert other.ping()["pong"]


@pytest.fixture
def open_daemons(tiny_model_dir):
    """Factory of daemons whose socket nobody may reach (directory 0755, socket 0777: opened on purpose)."""
    started = []

    def start(*flags: str) -> DaemonProcess:
        tmp = Path(tempfile.mkdtemp(prefix="qd-open-", dir="/tmp"))
        tmp.chmod(0o755)
        env = {"QUANTAD_RUNTIME_DIR": str(tmp), "QUANTAD_STATE_DIR": str(tmp / "state")}
        d = DaemonProcess(
            "--model", str(tiny_model_dir), "--quantum-tokens", "2", *flags,
            endpoint=f"ipc://{tmp}/agents.sock", env=env, log=tmp / "daemon.log", cwd=REPO,
        )  # fmt: skip
        started.append(d)
        d.start()
        sock = tmp / "agents.sock"
        sock.chmod(sock.stat().st_mode | stat.S_IRWXO)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def open_daemon(open_daemons):
    return open_daemons()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another uid")
def test_another_uid_sees_and_touches_nothing_of_ours(open_daemon):
    d = open_daemon
    with d.client(timeout=120) as c:
        secret = "my secret is 7421; now say hello"
        greedy(c, secret, session="s1")  # the session's context stays on the worker
        cid = c.submit(messages("a long one of ours"), max_tokens=300, min_tokens=300, temperature=0.0)
        pid = c.recv(cid)["pid"]
        seen = as_nobody(d.endpoint, "probe", {"pid": pid, "prompt": secret, "session": "s1"})
        assert "error" not in seen, seen
        assert pid not in seen["ps"] and seen["kill"] == seen["nice"] == "not_found"
        assert seen["reused"] == 0 and seen["owner"] == f"uid:{NOBODY}"  # its s1 is not ours
        ours = greedy(c, secret, session="s1")
        assert ours.stats["prompt_tokens_reused"] > 0 and ours.stats["owner"] == "uid:0"
        row = next(r for r in c.ps()["requests"] if r["pid"] == pid)
        assert row["owner"] == "uid:0" and row["nice"] == 0
        c.kill(pid)
        assert json.dumps(list(c.events(cid))[-1].event) == '"cancelled"'
    # The admin (the daemon's uid) sees and may kill another identity's request.
    with Nobody(d.endpoint, "hold", {}) as nobody, d.client(timeout=120) as c:
        told = nobody.recv()  # its request is accepted
        assert "pid" in told, told
        theirs = [r for r in c.ps()["requests"] if r["owner"] == f"uid:{NOBODY}"]
        assert [r["pid"] for r in theirs] == [told["pid"]]
        c.kill(told["pid"])
        out = nobody.recv()
    assert out.get("end") == "cancelled", out


# ---- CURVE, and a remote worker in another network namespace -------------------------------------
@pytest.fixture
def netns():
    """A network namespace joined to ours by a veth pair: 10.77.0.1 here, 10.77.0.2 there (nothing else)."""
    name = f"qd{os.getpid() % 100000}"
    host, peer = f"{name}a", f"{name}b"
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host, "type", "veth", "peer", "name", peer],
        ["ip", "link", "set", peer, "netns", name],
        ["ip", "addr", "add", "10.77.0.1/30", "dev", host],
        ["ip", "link", "set", host, "up"],
        ["ip", "netns", "exec", name, "ip", "addr", "add", "10.77.0.2/30", "dev", peer],
        ["ip", "netns", "exec", name, "ip", "link", "set", peer, "up"],
        ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for cmd in steps:
            subprocess.run(cmd, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        pytest.skip(f"cannot make a network namespace here: {exc}")
    yield name
    subprocess.run(["ip", "link", "del", host], capture_output=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def keygen(d: Path, name: str) -> tuple[Path, Path]:
    out = quantad("keygen", str(d), "--name", name)
    assert out.returncode == 0, out.stderr
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(d.stat().st_mode) == 0o700
    return public, secret


@pytest.mark.skipif(os.getuid() != 0, reason="needs root for a network namespace")
def test_curve_clients_and_a_remote_worker_over_a_veth_link(netns, tiny_model_dir, tmp_path):
    curve, mine = tmp_path / "curve", tmp_path / "mine"
    server_pub, _ = keygen(curve, "server")
    alice_pub, alice = keygen(mine, "alice")
    _, mallory = keygen(mine, "mallory")
    w_pub, w_secret = keygen(mine, "w-remote")
    for sub, key in (("clients", alice_pub), ("workers", w_pub)):
        (curve / sub).mkdir()
        shutil.copy(key, curve / sub / key.name)
    port = free_port()
    ep = f"tcp://10.77.0.1:{port}"
    env = {"QUANTAD_RUNTIME_DIR": str(tmp_path), "QUANTAD_STATE_DIR": str(tmp_path / "state")}
    plain = quantad("serve", "--model", str(tiny_model_dir), "--endpoint", ep, timeout=120)
    assert plain.returncode != 0 and "--curve-dir" in plain.stderr  # not loopback: no plaintext by default
    d = DaemonProcess("--model", str(tiny_model_dir), "--slots", "1", "--curve-dir", str(curve), endpoint=ep,
                      env=env, log=tmp_path / "daemon.log", cwd=REPO)  # fmt: skip
    remote = None
    try:
        os.environ["QUANTAD_CURVE_KEY"], os.environ["QUANTAD_CURVE_SERVER"] = str(alice), str(server_pub)
        d.start()
        with Client(ep, timeout=120) as c:
            r = greedy(c, "over curve")
            assert r.usage["completion_tokens"] == 6 and r.stats["owner"].startswith("key:")
        for key in (mallory, None):  # an unknown key; no key at all (plaintext)
            os.environ.pop("QUANTAD_CURVE_KEY")
            if key is not None:
                os.environ["QUANTAD_CURVE_KEY"] = str(key)
            with Client(ep, timeout=2) as c, pytest.raises(TimeoutError):
                c.ping(timeout=2)  # the handshake fails: not one message gets through
            os.environ["QUANTAD_CURVE_KEY"] = str(alice)
        remote = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "console", "worker", "--connect",
             f"tcp://10.77.0.1:{port + 1}", "--curve-key", str(w_secret), "--curve-server", str(server_pub),
             "--model", str(tiny_model_dir), "--slots", "2"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        with Client(ep, timeout=120) as c:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(
                w["name"] == "w-remote" and w["alive"] for w in c.ps()["workers"]
            ):
                time.sleep(0.01)  # polling ps with a deadline for the remote worker's ready
            cids = [c.submit(messages(f"job {i}"), max_tokens=8, min_tokens=8, temperature=0.0) for i in range(6)]
            done = [list(c.events(cid))[-1] for cid in cids]
        assert all(ev.event == "done" for ev in done), [ev.data for ev in done]
        assert {ev.data["worker"] for ev in done} >= {"w-remote"}
        assert "connection_refused" in d.log()
    finally:
        for var in ("QUANTAD_CURVE_KEY", "QUANTAD_CURVE_SERVER"):
            os.environ.pop(var, None)
        if remote is not None:
            remote.kill()
            remote.wait()
        d.stop()


def test_one_token_over_the_context_is_refused_by_the_daemon(tiny_model_dir, start_daemon):
    """Prompt + max_tokens one over the model's 2048 positions: refused at accept (no pid), no worker sees it."""
    d = start_daemon(tiny_model_dir)
    prompt = messages("count the words of this sentence " * 40)
    with d.client(timeout=120) as c:
        n = c.chat(prompt, max_tokens=1).usage["prompt_tokens"]
        cid = c.submit(prompt, max_tokens=2048 - n + 1)
        t = time.perf_counter()
        answer = c.recv(cid)
        took = time.perf_counter() - t
        assert answer["event"] == "error" and answer["code"] == "context_length_exceeded", answer
        assert "pid" not in answer and answer["message"].endswith("holds 2048")  # never accepted
        fits = c.submit(prompt, max_tokens=2048 - n)
        assert c.recv(fits)["event"] == "accepted"
        c.send({"op": "cancel", "id": fits})
        assert list(c.events(fits))[-1].event == "cancelled"
        huge = c.submit(messages("x " * 400_000), max_tokens=1)  # 800 kB: refused without tokenizing it all
        assert c.recv(huge)["code"] == "context_length_exceeded"
    print(f"refused in {took * 1000:.1f} ms")


def test_a_connection_that_stops_reading_has_its_requests_cancelled(tiny_model_dir, start_daemon):
    """Past --max-unread replies buffered for it, the daemon cancels its requests instead of buffering more."""
    d = start_daemon(tiny_model_dir, "--slots", "3", "--max-unread", "5")
    d.wait_ready()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger, s.rcvhwm, s.rcvbuf = 0, 1, 4096  # and it reads nothing
    s.connect(d.endpoint)
    for i in range(3):
        chat = {"v": 1, "op": "chat", "id": i, "stream": True, "max_tokens": 2000, "min_tokens": 2000,
                "messages": messages(f"a long story {i}")}  # fmt: skip
        s.send(msgpack.packb(chat))
    try:
        with d.client(timeout=30) as c:
            deadline = time.monotonic() + 120
            while c.call("stats")["finished"].get("CANCELLED", 0) < 3:
                assert time.monotonic() < deadline, c.call("stats")
                time.sleep(0.05)  # polling stats with a deadline
            assert [r for r in c.ps()["requests"]] == []
    finally:
        ctx.destroy(0)
    assert "agent_gone" in d.log()


def test_connections_over_the_limit_are_refused_at_the_handshake(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--max-connections", "3")
    d.wait_ready()
    clients = [Client(d.endpoint, timeout=30) for _ in range(3)]
    try:
        for c in clients:
            assert c.ping()["pong"]
        with Client(d.endpoint, timeout=2) as extra, pytest.raises(TimeoutError):
            extra.ping(timeout=2)  # the fourth connection: refused, not one message through
        clients.pop().close()
        deadline = time.monotonic() + 30
        while True:  # once the daemon has seen that one go, a new connection gets in
            with Client(d.endpoint, timeout=1) as again:
                try:
                    assert again.ping(timeout=1)["pong"]
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline
    finally:
        for c in clients:
            c.close()
    assert "connection_refused" in d.log()
