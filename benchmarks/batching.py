"""Batching, sessions, tier switch costs and batch exactness on the real SmolLM2-135M.

Run: ``python -m benchmarks.batching [--quick]``.  Four questions, each answered by ratios measured
within this one run (the machine is shared, so absolute figures drift), each one a module that also
runs alone (``python -m benchmarks.throughput``, ...):

1. Throughput (``throughput.py``): does the daemon's continuous batching (``--slots 16``, round robin,
   100 ms quanta, twice as many requests as slots) deliver the tokens/s of a bare batched loop in one
   process, and how much does it gain over one-at-a-time round robin (``--slots 1``)?
2. Sessions (``sessions.py``): in an agent loop whose conversation grows every turn, does keeping the
   context under a session id make each turn prefill only its new tokens (and keep its latency flat)?
3. Batch exactness (``exactness.py``): are greedy and seeded-sampling outputs the same in a batch as alone?
4. Switch cost per tier (``switch_costs.py``): do the host and disk tiers of ``ContextManager`` run near
   the speed of a bare memcpy and of a bare file write + fsync + read, and where does the cost model put
   the crossover between swapping to disk and recomputing?  (In this process, after the daemons stop.)

The daemons are real ``quantad serve`` subprocesses, all started at once and shared by the parts that
need the same one (SIGTERM at the end, workers checked gone).
"""

from __future__ import annotations

from benchmarks import exactness, sessions, suite, switch_costs, throughput

PARTS = (throughput.PART, sessions.PART, exactness.PART, switch_costs.PART)


def main(argv: list[str] | None = None) -> int:
    return suite.main("benchmarks.batching", "quantad batching benchmarks", PARTS, argv, __doc__.splitlines()[0],
                      "8 requests, 4 slots, 16 tokens, 4 turns (~1.5 min idle)")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
