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
