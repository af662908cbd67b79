"""The llama.cpp worker's decode loop against a bare ``llama_decode`` loop over the same rows.

Why: at light load each request should finish as fast as on the engine we wrap, so the worker's
own step (choosing tokens, streaming text, quantum accounting, one message per token, the
daemon's round trips) must cost little next to ``llama_decode`` itself.  The bare side is a
plain loop in this process on ``backends.llama_model.LlamaModel``: the rows' prompts prefilled,
then one ``llama_decode`` of one token per row per step, greedy by one argmax.  The worker side
is a real daemon (``quantad serve --backend llamacpp``, the same threads, ``--slots`` = rows)
given as many concurrent greedy chats of exactly ``--tokens`` tokens; its decode rate is the
tokens streamed while every row decodes (from the last row's first token to the first row's
end), as the client receives them.  Rounds alternate bare / worker on one loaded model and one
running daemon, and each ratio pairs a round's two sides (this machine's speed drifts).

``python -m benchmarks.step_overhead [--rows 1,4,16] [--tokens 128] [--threads 2] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

import numpy as np

from benchmarks.common import median, table
from ipc import events as E
from ipc.launcher import DaemonProcess

PROMPT = "Write a long story about a lighthouse keeper, row {i}."


class Bare:
    """The bare loop's model and prompts, loaded once for every round of a row count."""

    def __init__(self, gguf: str, rows: int, threads: int):
        from pathlib import Path

        from backends import chat
        from backends.llama_model import LlamaModel
        from backends.llamacpp_engine import load_tokenizer

        tok = load_tokenizer(Path(gguf))
        self.model = LlamaModel(gguf, slots=rows, ctx_size=0, threads=threads, batch=2048)
        self.prompts = [chat.render(tok, [{"role": "user", "content": PROMPT.format(i=i)}], None) for i in range(rows)]

    def rate(self, tokens: int) -> float:
        """Decode tokens per second: every row's prompt prefilled, then ``tokens`` steps, greedy."""
        m, rows = self.model, len(self.prompts)
        sids = [m.acquire() for _ in range(rows)]
        pos = [len(p) for p in self.prompts]
        try:
            logits = m.decode([(s, 0, p) for s, p in zip(sids, self.prompts, strict=True)])
            t0 = time.perf_counter()
            for _ in range(tokens):
                nxt = logits.argmax(-1).tolist()
                logits = m.decode([(s, pos[i], [nxt[i]]) for i, s in enumerate(sids)])
                pos = [p + 1 for p in pos]
            return rows * tokens / (time.perf_counter() - t0)
        finally:
            for i, s in enumerate(sids):
                m.release(s, pos[i])

    def close(self) -> None:
        self.model.close()


async def _worker_window(c, rows: int, tokens: int) -> float:

    arrivals: list[list[tuple[float, int]]] = [[] for _ in range(rows)]

    async def one(i: int) -> None:
        stream = await c.chat(PROMPT.format(i=i), stream=True, max_tokens=tokens, min_tokens=tokens, temperature=0)
        async for ev in stream:
            if isinstance(ev, E.Token):
                arrivals[i].append((time.perf_counter(), len(ev.token_ids) or 1))

    await asyncio.gather(*(one(i) for i in range(rows)))
    start = max(a[0][0] for a in arrivals)  # every row decoding from here
    end = min(a[-1][0] for a in arrivals)  # until the first row ends
    n = sum(k for a in arrivals for t, k in a if start < t <= end)
    return n / max(end - start, 1e-9)


def worker(gguf: str, rows: int, threads: int) -> DaemonProcess:
    tmp = tempfile.mkdtemp(prefix="qd-step-")
    flags = ["--model", gguf, "--backend", "llamacpp", "--slots", str(rows), "--threads", str(threads)]
    flags += ["--policy", "rr", "--log-level", "WARNING", "--no-journal", "--cache-ram", "0"]
    d = DaemonProcess(*flags, endpoint=f"ipc://{tmp}/a.sock", env={"QUANTAD_RUNTIME_DIR": tmp}, log=f"{tmp}/log")
    return d.start()


def rounds(gguf: str, rows: int, tokens: int, threads: int, n: int) -> tuple[list[float], list[float]]:
    """``n`` rounds of bare then worker, one model and one daemon for all of them (alternating closely:
    this machine's speed drifts by minutes)."""
    from ipc.client import AsyncClient

    bare, d = Bare(gguf, rows, threads), worker(gguf, rows, threads)
    try:

        async def go() -> tuple[list[float], list[float]]:
            b, w = [], []
            async with AsyncClient(d.endpoint) as c:
                await c.chat("warm up", max_tokens=4)
                for _ in range(n):
                    b.append(bare.rate(tokens))
                    w.append(await _worker_window(c, rows, tokens))
            return b, w

        return asyncio.run(go())
    finally:
        d.stop()
        bare.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default="")
    args = ap.parse_args(argv)
    from backends.model_store import default_gguf

    gguf = args.model or str(default_gguf())
    out = []
    for rows in (int(r) for r in args.rows.split(",")):
        bare, worker = rounds(gguf, rows, args.tokens, args.threads, args.rounds)
        ratios = [w / b for w, b in zip(worker, bare, strict=True)]
        out.append([str(rows), f"{median(bare):.1f}", f"{median(worker):.1f}", f"{median(ratios):.3f}",
                    f"{min(ratios):.3f}-{max(ratios):.3f}"])  # fmt: skip
        print(f"rows={rows} bare={np.round(bare, 1)} worker={np.round(worker, 1)}", flush=True)
    print(table(["rows", "bare tok/s", "worker tok/s", "ratio (median)", "ratio range"], out))


if __name__ == "__main__":
    main()
