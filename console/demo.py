"""``quantad demo``: start a daemon, submit concurrent chats, show them take turns."""

from __future__ import annotations

import asyncio
import sys
import time

from ipc import events as E
from ipc.launcher import DaemonError, DaemonProcess

QUESTIONS = [
    "Which city is the capital of France?",  # (SmolLM2 Q4_1 answers "What is the capital of France?" in French)
    "Name three colors of the rainbow.",
    "Write one sentence about the moon.",
]


async def _wait_ready(daemon: DaemonProcess) -> None:
    """Wait for the workers, with a ticking progress line (the first run converts the model)."""
    start = time.monotonic()
    ready = asyncio.ensure_future(daemon.await_ready(timeout=600))
    while not ready.done():
        sys.stderr.write(
            f"\rstarting daemon and worker (a first run converts the model once) ... {time.monotonic() - start:4.0f} s"
        )
        sys.stderr.flush()
        await asyncio.wait([ready], timeout=0.5)  # the tick of the progress line; readiness is the ping answer
    try:
        ready.result()
    except DaemonError as exc:
        if exc.returncode is None:
            raise
        raise SystemExit(f"quantad demo: the daemon exited {exc.returncode}:\n{exc.log[-3000:]}") from None
    sys.stderr.write(f"\rdaemon ready in {time.monotonic() - start:.1f} s{' ' * 20}\n")


async def _demo(daemon: DaemonProcess, max_tokens: int) -> None:
    await _wait_ready(daemon)
    async with daemon.aclient(agent="demo") as client:
        w = (await client.workers())["workers"][0]
        print(f"engine: {w['backend']} ({w['model']})")
        t0 = time.monotonic()
        print(f"\nSubmitting {len(QUESTIONS)} requests at once to one worker slot; each quantum is a few tokens.\n")
        streams = [await client.chat(q, stream=True, max_tokens=max_tokens) for q in QUESTIONS]
        results: dict[int, str] = {}

        async def follow(i: int, stream) -> None:
            pid, segment = None, ""
            async for ev in stream:
                stamp = f"[{time.monotonic() - t0:5.2f}s]"
                if isinstance(ev, E.Accepted):
                    pid = ev.pid
                    print(f"{stamp} pid {pid} accepted: {QUESTIONS[i]!r}")
                elif isinstance(ev, E.Token):
                    segment += ev.text
                elif isinstance(ev, E.Preempted):
                    print(
                        f"{stamp} pid {pid} preempted after {ev.tokens:3d} tokens "
                        f"(context kept on {ev.context}) ... {segment!r}"
                    )
                    segment = ""
                elif isinstance(ev, E.Resumed):
                    print(f"{stamp} pid {pid} resumed on {ev.worker} from its {ev.context} snapshot")
                elif isinstance(ev, (E.Done, E.Error, E.Cancelled)):
                    s = ev.stats or {}
                    print(
                        f"{stamp} pid {pid} {ev.event} ... {segment!r}  "
                        f"[quanta={s.get('quanta')} preemptions={s.get('preemptions')} "
                        f"prefill computed={s.get('prompt_tokens_computed')}]"
                    )
                    results[i] = ev.text if isinstance(ev, E.Done) else f"<{ev.event}>"

        await asyncio.gather(*(follow(i, s) for i, s in enumerate(streams)))
        print("\nAnswers:")
        for i, q in enumerate(QUESTIONS):
            print(f"  Q: {q}\n  A: {results[i].strip()}\n")


def run_demo(model: str, quantum_tokens: int, max_tokens: int = 40) -> int:
    daemon = DaemonProcess("--model", model, "--quantum-tokens", str(quantum_tokens)).spawn()
    try:
        asyncio.run(_demo(daemon, max_tokens))
    finally:
        code = daemon.stop(cut=False)
    print(f"daemon stopped (exit {code}).")
    return 0
