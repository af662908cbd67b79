"""How often llama.cpp's greedy output depends on what else is in the batch or the cache.

The HF engine is bit-exact (fp32 on CPU): a request's greedy output is the same alone, batched or
preempted.  llama.cpp's kernels are not: batched rows round differently from single ones, and with
two threads flash attention splits a sequence's cells between the threads by where they lie in the
cache.  This counts, over the benchmark prompts, the requests whose greedy tokens equal the alone
run's, in a plain llama.cpp loop (``backends.llama_model``, the default GGUF):

* alone with 1 or 2 threads, after a neighbour sequence of 230 cells (placement);
* 16 rows decoded together (batching), 1 and 2 threads.

``python -m benchmarks.llama_exactness [--tokens N]``.
"""

from __future__ import annotations

import argparse

from backends import chat
from backends.llama_model import LlamaModel
from backends.llamacpp_engine import load_tokenizer
from backends.model_store import default_gguf
from benchmarks.common import PROMPTS, table


def _greedy(m: LlamaModel, prompts: list[list[int]], n: int, neighbour: int = 0) -> list[list[int]]:
    """All prompts decoded together (one row each), greedy, ``n`` tokens; a neighbour sequence first."""
    m.L.llama_memory_clear(m.mem, True)
    m.held, m.free_ids = 0, list(range(m.n_seq_max - 1, -1, -1))
    if neighbour:
        m.decode([(m.acquire(), 0, [100 + i % 500 for i in range(neighbour)])])
    sids = [m.acquire() for _ in prompts]
    logits = m.decode([(s, 0, p) for s, p in zip(sids, prompts, strict=True)])
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(n):
        toks = [int(logits[i].argmax()) for i in range(len(prompts))]
        for o, t in zip(out, toks, strict=True):
            o.append(t)
        logits = m.decode([(s, len(p) + step, [t]) for s, p, t in zip(sids, prompts, toks, strict=True)])
    return out


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def measure(n: int) -> list[tuple[str, ...]]:
    gguf = default_gguf()
    tok = load_tokenizer(gguf)
    texts = [f"{p} (Answer {i}.)" for i, p in enumerate(PROMPTS * 2)]  # 16 prompts
    prompts = [chat.render(tok, [{"role": "user", "content": p}]) for p in texts]
    rows = []
    for threads in (1, 2):
        m = LlamaModel(str(gguf), slots=16, ctx_size=8192, threads=threads)
        try:
            alone = [_greedy(m, [p], n)[0] for p in prompts]
            cases = {
                "alone, after a 230-cell neighbour": [_greedy(m, [p], n, neighbour=230)[0] for p in prompts],
                "16 rows in one batch": _greedy(m, prompts, n),
            }
        finally:
            m.close()
        for name, got in cases.items():
            div = [d for a, g in zip(alone, got, strict=True) if (d := _first_divergence(a, g)) is not None]
            rows.append((f"{threads}", name, f"{len(prompts) - len(div)}/{len(prompts)}",
                         ", ".join(map(str, sorted(div))) or "-"))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llama_exactness", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args(argv)
    print(f"greedy, {args.tokens} tokens per request; identical to the request alone (same thread count)\n")
    print(table(["threads", "case", "identical", "first divergence at token"], measure(args.tokens)))


if __name__ == "__main__":
    main()
