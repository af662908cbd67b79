"""Memory pressure: shrink a tier's budget when the machine itself runs short.

A byte budget is an upper bound the operator chose; what is actually free can be less
(other processes, the model's own activations).  Keep a reserve free: the effective
budget of a tier is at most what that tier already uses plus what is free beyond the
reserve.  Host memory is read with psutil; device memory with ``torch.cuda.mem_get_info``.
"""

from __future__ import annotations

import time

import psutil
import torch

HOST_RESERVE = 1 << 30  # leave this much RAM free for everything else
DEVICE_RESERVE = 1 << 30


_CACHE_S = 0.1
_last: tuple[float, int] = (-1.0, 0)


def host_free() -> int:
    """Free RAM beyond the reserve, read at most every 100 ms (psutil costs ~30 us a call,
    more than a whole device-tier switch)."""
    global _last
    now = time.monotonic()
    if now - _last[0] > _CACHE_S:
        _last = (now, max(psutil.virtual_memory().available - HOST_RESERVE, 0))
    return _last[1]


def device_free(device: torch.device) -> int | None:
    """Free accelerator memory beyond the reserve; None where the device is the CPU."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return max(free - DEVICE_RESERVE, 0)


def effective(budget: int, used: int, free: int | None) -> int:
    return budget if free is None else min(budget, used + free)
