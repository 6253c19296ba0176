"""The spread of a cell over seeds, as each paper printed it. Pure Python: no scipy (not a dependency).

- ASAM paper: mean ± the sample standard deviation s (ddof = 1).
- SAM paper: mean ± the 95 % confidence interval of the mean, t_{0.975, n-1} * s / sqrt(n) over n seeds
  (Student's t, two-sided 95 %).
"""
from __future__ import annotations

import math
from statistics import NormalDist

# t_{0.975, df} for df = 1..30 (Student's t, 4 decimals, as every statistics table prints it).
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom. Beyond the table (df > 30), the
    Cornish-Fisher expansion around the normal quantile, within 1e-5 of the exact value there."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = NormalDist().inv_cdf(0.975)
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def std(values: list[float]) -> float:
    """The sample standard deviation (ddof = 1) of two or more values."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def ci95(values: list[float]) -> float:
    """Half-width of the 95 % confidence interval of the mean: t_{0.975, n-1} * s / sqrt(n), n >= 2."""
    return t975(len(values) - 1) * std(values) / math.sqrt(len(values))
