"""Statistics over seeds: mean ± sample standard deviation, and the paired difference of two variants with a 95 %
t-interval (Student's t with n - 1 degrees of freedom over the per-seed differences).

Pairing by seed removes what the seeds share (same data order and initialisation per seed across variants), so
the interval is about the variant's effect, not the seed-to-seed spread of each model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation (n - 1); nan for one seed
    n: int

    def text(self, digits: int = 3) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class Difference:
    """variant - baseline, paired by seed: mean, the 95 % interval (None for one seed) and its seeds."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def excludes_zero(self) -> bool | None:
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 3) -> str:
        if self.low is None:
            return f"{self.mean:+.{digits}f} (n/a)"
        mark = " *" if self.excludes_zero else ""
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]{mark}"


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("summarize needs at least one value")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return Summary(mean, std, n)


def t_quantile(dof: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t critical value t_{(1 + confidence)/2, dof}."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, dof))


def paired_difference(variant: Mapping[int, float], baseline: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> Difference:
    """Mean of variant[s] - baseline[s] over the seeds both have, with mean ± t * sd / sqrt(n) (n - 1 dof)."""
    seeds = sorted(set(variant) & set(baseline))
    if not seeds:
        raise ValueError("no seed in common between the variant and the baseline")
    diffs = [variant[s] - baseline[s] for s in seeds]
    summary = summarize(diffs)
    if summary.n < 2:
        return Difference(summary.mean, None, None, 1)
    half = t_quantile(summary.n - 1, confidence) * summary.std / math.sqrt(summary.n)
    return Difference(summary.mean, summary.mean - half, summary.mean + half, summary.n)


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float | None, float | None]:
    """(mean, low, high): the 95 % t-interval of the mean over seeds (None, None for one value) — a curve's band."""
    summary = summarize(values)
    if summary.n < 2:
        return summary.mean, None, None
    half = t_quantile(summary.n - 1, confidence) * summary.std / math.sqrt(summary.n)
    return summary.mean, summary.mean - half, summary.mean + half


@dataclass(frozen=True)
class Trend:
    """y = intercept + slope * log10(x), least squares over every (x, seed) point, with the slope's 95 % interval
    (t on n - 2 degrees of freedom) and a prediction at ``x_new`` with its 95 % interval for the mean response."""

    intercept: float
    slope: float
    slope_low: float
    slope_high: float
    n: int
    x_new: float | None = None
    predicted: float | None = None
    predicted_low: float | None = None
    predicted_high: float | None = None


def log_trend(xs: Sequence[float], ys: Sequence[float], x_new: float | None = None,
              confidence: float = CONFIDENCE) -> Trend:
    """Ordinary least squares of y on log10(x) (x > 0; at least three points at two or more x values)."""
    if len(xs) != len(ys) or len(xs) < 3 or any(x <= 0 for x in xs) or len(set(xs)) < 2:
        raise ValueError("a log trend needs >= 3 points with x > 0 at >= 2 distinct x values")
    u = [math.log10(x) for x in xs]
    n = len(u)
    mu, my = sum(u) / n, sum(ys) / n
    sxx = sum((a - mu) ** 2 for a in u)
    slope = sum((a - mu) * (b - my) for a, b in zip(u, ys)) / sxx
    intercept = my - slope * mu
    rss = sum((b - intercept - slope * a) ** 2 for a, b in zip(u, ys))
    sigma = math.sqrt(rss / (n - 2)) if n > 2 else float("nan")
    t = t_quantile(n - 2, confidence)
    half = t * sigma / math.sqrt(sxx)
    trend = Trend(intercept, slope, slope - half, slope + half, n)
    if x_new is None:
        return trend
    u_new = math.log10(x_new)
    pred = intercept + slope * u_new
    half_pred = t * sigma * math.sqrt(1 / n + (u_new - mu) ** 2 / sxx)
    return Trend(intercept, slope, slope - half, slope + half, n, x_new, pred, pred - half_pred, pred + half_pred)
