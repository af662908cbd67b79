"""Memory pressure: shrink a tier's budget when the machine itself runs short.

A byte budget is an upper bound the operator chose; what is actually free can be less
(other processes, the model's own activations).  Keep a reserve free: the effective
budget of a tier is at most what that tier already uses plus what is free beyond the
reserve.  Host memory is read with psutil; device memory with ``torch.cuda.mem_get_info``.
"""

from __future__ import annotations

import psutil
import torch

HOST_RESERVE = 1 << 30  # leave this much RAM free for everything else
DEVICE_RESERVE = 1 << 30


def host_free() -> int:
    return max(psutil.virtual_memory().available - HOST_RESERVE, 0)


def device_free(device: torch.device) -> int | None:
    """Free accelerator memory beyond the reserve; None where the device is the CPU."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return max(free - DEVICE_RESERVE, 0)


def effective(budget: int, used: int, free: int | None) -> int:
    return budget if free is None else min(budget, used + free)
