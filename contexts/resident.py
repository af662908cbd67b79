"""A context still held in an engine's own memory: the device tier with no copy at all.

llama.cpp keeps every sequence's KV in one unified cache of its own, so a preempted sequence
can simply stay there under its sequence id: suspending it costs nothing, resuming it costs
nothing.  The context manager holds such a snapshot like any other and, when the device budget
(or the engine, short of cache cells or sequence ids) asks for room, evicts it: the engine copies
the sequence's state out as host tensors and frees its cells.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

Layers = list[tuple[torch.Tensor, torch.Tensor]]


class Resident(ABC):
    """A handle on a context the engine holds; ``tokens`` and ``nbytes`` are what it covers and costs."""

    tokens: int
    nbytes: int

    @abstractmethod
    def evict(self) -> Layers:
        """Copy the context out as host tensors (the engine's snapshot form) and free what the engine held."""

    @abstractmethod
    def free(self) -> None:
        """Drop the context: the engine's memory is free again."""
