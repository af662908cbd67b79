"""Swap or recompute: which is cheaper for a context leaving host memory.

Swapping costs a disk write now and a read on resume; recomputing costs a prefill of the
tokens the KV covers.  Which wins depends on the machine (on a CPU swapping wins by far, on
a GPU prefill is fast), so the estimates start from guesses and follow measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CostModel:
    """Current estimates; the first measurement replaces a guess, later ones are averaged (EMA)."""

    write_Bps: float = 1.0e9
    read_Bps: float = 2.0e9
    prefill_tps: float = 500.0
    alpha: float = 0.3  # weight of a new measurement
    _measured: set[str] = field(default_factory=set, repr=False)

    def swap_s(self, nbytes: int) -> float:
        return nbytes / self.write_Bps + nbytes / self.read_Bps

    def recompute_s(self, tokens: int) -> float:
        return tokens / self.prefill_tps

    def prefer_disk(self, nbytes: int, tokens: int) -> bool:
        """On a tie recompute: it needs no disk space."""
        return self.swap_s(nbytes) < self.recompute_s(tokens)

    def observe_write(self, nbytes: int, seconds: float) -> None:
        self._observe("write_Bps", nbytes, seconds)

    def observe_read(self, nbytes: int, seconds: float) -> None:
        self._observe("read_Bps", nbytes, seconds)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        self._observe("prefill_tps", tokens, seconds)

    def as_dict(self) -> dict[str, float]:
        return {"write_Bps": self.write_Bps, "read_Bps": self.read_Bps, "prefill_tps": self.prefill_tps}

    def _observe(self, name: str, amount: float, seconds: float) -> None:
        if amount <= 0 or seconds <= 0:  # nothing measured (or a clock too coarse to tell)
            return
        rate = amount / seconds
        if name in self._measured:
            rate = (1 - self.alpha) * getattr(self, name) + self.alpha * rate
        self._measured.add(name)
        setattr(self, name, rate)
