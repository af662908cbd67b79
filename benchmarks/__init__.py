"""Benchmarks of quantad on the real SmolLM2-135M model: context switch, scheduler overhead, KV vs recompute.

Every figure that matters is a ratio of two things measured in the same run, so the noise of a
shared machine hits both sides alike.  Run them all with ``python -m benchmarks.core``.
"""
