"""Mean and 95% confidence interval of the mean (Student t, no scipy): `mean_ci95`."""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field


TextsOf = Callable[[Iterable[str]], list[str]]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


def _t_pdf(x: float, df: int) -> float:
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(logc - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf(x: float, df: int, intervals: int = 2000) -> float:
    """P(T <= x) for x >= 0 by Simpson's rule on [0, x] (the density is smooth there)."""
    if x <= 0:
        return 0.5
    h = x / intervals
    s = _t_pdf(0.0, df) + _t_pdf(x, df)
    s += 4 * sum(_t_pdf((2 * i - 1) * h, df) for i in range(1, intervals // 2 + 1))
    s += 2 * sum(_t_pdf(2 * i * h, df) for i in range(1, intervals // 2))
    return 0.5 + s * h / 3


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 <= p < 1) of Student's t with `df` degrees of freedom."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError("t_quantile needs 0.5 <= p < 1 and df >= 1")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Summary:
    mean: float
    ci95: float  # half-width of the 95% confidence interval of the mean (0 for n = 1)
    n: int
    sd: float  # sample standard deviation (n - 1)


def mean_ci95(values: Sequence[float]) -> Summary:
    """Mean and 95% CI half-width t(0.975, n-1) * sd / sqrt(n) of independent measurements."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci95 of no values")
    mean = statistics.fmean(values)
    if n == 1:
        return Summary(mean, 0.0, 1, 0.0)
    sd = statistics.stdev(values)
    return Summary(mean, t_quantile(0.975, n - 1) * sd / math.sqrt(n), n, sd)
