"""Choose one option per group to minimise the summed cost (predicted KL) within a byte budget:
the multiple-choice knapsack, solved exactly by dynamic programming over bytes in a coarse unit.

Byte costs are rounded UP to the unit and the capacity DOWN, so any solution found fits the real
budget; with ``unit=1`` (or costs that are multiples of it) the DP is exact.
"""
from __future__ import annotations

import math

import numpy as np

DEFAULT_STEPS = 8192  # the budget is cut into about this many units


def unit_for(capacity: int, steps: int = DEFAULT_STEPS) -> int:
    return max(1, math.ceil(capacity / steps))


def allocate(costs: list[list[int]], values: list[list[float]], capacity: int, unit: int = 1) -> list[int] | None:
    """Indices (one per group) minimising sum(values) with sum(costs) <= capacity, or None when
    even the cheapest choices do not fit. Ties go to the cheaper option listed first."""
    if capacity < 0:
        return None
    cap = capacity // unit
    n = len(costs)
    if sum(math.ceil(min(c) / unit) for c in costs) > cap:
        return None
    best = np.zeros(cap + 1)  # best[c]: least value over the groups so far within c units
    picks = np.zeros((n, cap + 1), np.int16)
    for gi in range(n):
        new = np.full(cap + 1, np.inf)
        for j, (c, v) in enumerate(zip(costs[gi], values[gi])):
            k = math.ceil(c / unit)
            if k > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[k:] = best[: cap + 1 - k] + v
            better = cand < new
            new[better] = cand[better]
            picks[gi, better] = j
        best = new
    if not np.isfinite(best[cap]):
        return None
    out, c = [0] * n, cap
    for gi in range(n - 1, -1, -1):
        j = int(picks[gi, c])
        out[gi] = j
        c -= math.ceil(costs[gi][j] / unit)
    return out
