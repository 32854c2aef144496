"""The statistics of the report: binomial tail against chance, mean and standard deviation, rates over levels."""

from __future__ import annotations

import math


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of k successes in n trials against chance p."""
    return min(1.0, sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1)))


# -------------------------------------------------------------------------------------------- aggregation
def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def focus_rate(by_level: dict, key: str, focus) -> float:
    """``key`` over the ``focus`` levels present in ``by_level``, weighted by each level's ``n`` (0 when none)."""
    rows = [by_level[x] for x in focus if x in by_level]
    n = sum(r["n"] for r in rows)
    return sum(r[key] * r["n"] for r in rows) / n if n else 0.0
