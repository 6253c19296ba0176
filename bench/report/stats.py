"""The spread of a cell over seeds, as each paper printed it. Pure Python: no scipy (not a dependency).

- ASAM paper: mean ± the sample standard deviation s (ddof = 1).
- SAM paper: mean ± the 95 % confidence interval of the mean, t_{0.975, n-1} * s / sqrt(n) over n seeds
  (Student's t, two-sided 95 %).

And Kendall's tau-b, the rank correlation of two measures over the same cells (ties handled).
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


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b: (C - D) / sqrt((n0 - n1) (n0 - n2)) over the n0 = n (n - 1) / 2 pairs, C / D the
    concordant / discordant pairs, n1 / n2 the pairs tied in x / in y (a pair tied in both counts in both,
    as scipy's). NaN for fewer than 2 points, a NaN value, or a constant x or y (zero variance). O(n^2):
    tables of cells are small."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau needs two sequences of one length, got {len(x)} and {len(y)}")
    x, y = [float(v) for v in x], [float(v) for v in y]      # numpy arrays / ints alike
    n = len(x)
    if n < 2 or any(math.isnan(v) for v in (*x, *y)):
        return math.nan
    concordant = discordant = tied_x = tied_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            tied_x += dx == 0
            tied_y += dy == 0
            concordant += dx * dy > 0
            discordant += dx * dy < 0
    pairs = n * (n - 1) // 2
    denom = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return (concordant - discordant) / denom if denom else math.nan
