"""Benchmarks of quantad on the real SmolLM2-135M model, one module each (README.md lists them).

Every figure that matters is a ratio of two things measured in the same run, so the noise of a
shared machine hits both sides alike.  ``python -m benchmarks.core`` runs context switch, scheduler
overhead and KV vs recompute; ``python -m benchmarks.batching`` runs throughput, sessions, batch
exactness and switch cost per tier.
"""
