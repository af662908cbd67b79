"""Which llama.cpp sequence ids to swap so that a step's rows sit on consecutive ids.

With a KV stream per sequence id, llama.cpp splits a decode into one micro-batch per run of
consecutive ids (``LlamaModel.swap`` says how much that costs), so a step's rows must hold a
window of ids side by side.  Suspended sequences keep their ids, so after a few preemptions the
running rows are scattered; ``packing`` picks the window that moves the fewest bytes.
"""

from __future__ import annotations

from collections.abc import Callable


def packing(used: set[int], n_ids: int, tokens: Callable[[int], int]) -> list[tuple[int, int]]:
    """Swaps ``(row's id, id in the window)`` that put ``used`` on consecutive ids.

    ``tokens(i)`` is what id ``i`` holds (0 when free); a swap moves both ids' cells, so the
    window that costs the fewest tokens wins, then the one with the fewest swaps, then the lowest.
    """
    k = len(used)
    if k == 0 or max(used) - min(used) + 1 == k:
        return []

    def cost(w: int) -> tuple[int, int, int]:
        movers = [u for u in used if not w <= u < w + k]
        holes = [i for i in range(w, w + k) if i not in used]
        return sum(map(tokens, movers)) + sum(map(tokens, holes)), len(movers), w

    best = min(range(n_ids - k + 1), key=cost)
    movers = sorted(u for u in used if not best <= u < best + k)
    holes = [i for i in range(best, best + k) if i not in used]
    return list(zip(movers, holes, strict=True))
