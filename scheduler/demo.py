"""``quantad demo``: start a daemon, submit concurrent chats, show them take turns."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ipc.client import AsyncClient

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "Write one sentence about the moon.",
]


async def _wait_ready(client: AsyncClient, proc: subprocess.Popen, log: Path) -> None:
    """Wait for the workers, with a ticking progress line (the first run converts the model)."""
    start = time.monotonic()
    ready = asyncio.ensure_future(client.wait_ready(timeout=600))
    while not ready.done():
        if proc.poll() is not None:
            ready.cancel()
            raise SystemExit(f"quantad demo: the daemon exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        sys.stderr.write(
            f"\rstarting daemon and worker (a first run converts the model once) ... {time.monotonic() - start:4.0f} s"
        )
        sys.stderr.flush()
        await asyncio.wait([ready], timeout=0.5)
    ready.result()
    sys.stderr.write(f"\rdaemon ready in {time.monotonic() - start:.1f} s{' ' * 20}\n")


async def _demo(endpoint: str, proc: subprocess.Popen, log: Path, max_tokens: int) -> None:
    async with AsyncClient(endpoint, agent="demo") as client:
        await _wait_ready(client, proc, log)
        t0 = time.monotonic()
        print(f"\nSubmitting {len(QUESTIONS)} requests at once to one worker slot; each quantum is a few tokens.\n")
        streams = [await client.chat(q, stream=True, max_tokens=max_tokens) for q in QUESTIONS]
        results: dict[int, str] = {}

        async def follow(i: int, stream) -> None:
            pid, segment = None, ""
            async for ev in stream:
                stamp = f"[{time.monotonic() - t0:5.2f}s]"
                if ev.event == "accepted":
                    pid = ev.data["pid"]
                    print(f"{stamp} pid {pid} accepted: {QUESTIONS[i]!r}")
                elif ev.event == "token":
                    segment += ev.text
                elif ev.event == "preempted":
                    print(f"{stamp} pid {pid} preempted after {ev.data['tokens']:3d} tokens "
                          f"(context kept on {ev.data['context']}) ... {segment!r}")  # fmt: skip
                    segment = ""
                elif ev.event == "resumed":
                    print(f"{stamp} pid {pid} resumed on {ev.data['worker']} from its {ev.data['context']} snapshot")
                elif ev.terminal:
                    s = ev.data.get("stats", {})
                    print(f"{stamp} pid {pid} {ev.event} ... {segment!r}  "
                          f"[quanta={s.get('quanta')} preemptions={s.get('preemptions')} "
                          f"prefill computed={s.get('prompt_tokens_computed')}]")  # fmt: skip
                    results[i] = ev.data.get("text", "") if ev.event == "done" else f"<{ev.event}>"

        await asyncio.gather(*(follow(i, s) for i, s in enumerate(streams)))
        print("\nAnswers:")
        for i, q in enumerate(QUESTIONS):
            print(f"  Q: {q}\n  A: {results[i].strip()}\n")


def run_demo(model: str, quantum_tokens: int, max_tokens: int = 40) -> int:
    with tempfile.TemporaryDirectory(prefix="quantad-demo-") as tmp:
        endpoint = f"ipc://{tmp}/agents.sock"
        log = Path(tmp) / "daemon.log"
        cmd = [sys.executable, "-m", "scheduler", "serve", "--model", model, "--endpoint", endpoint,
               "--quantum-tokens", str(quantum_tokens)]  # fmt: skip
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            asyncio.run(_demo(endpoint, proc, log, max_tokens))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"daemon stopped (exit {proc.returncode}).")
    return 0
