"""Means with bootstrap confidence intervals, and paired differences between targets.

Every number `vocalign eval` reports is a mean over prompts with a 95% percentile
bootstrap interval: the prompts are resampled with replacement `resamples` times and
the interval is the 2.5th to 97.5th percentile of the resampled means. Targets are
scored on the same prompts, so a difference between two targets is bootstrapped over
the pairs (each resample draws prompts, and both targets' values for them), which is
much tighter than comparing two separate intervals when the targets agree on most
prompts.

A value of None (no score for that prompt, e.g. a style metric on a prompt that asked
for no style) is left out of the mean; a paired difference uses the prompts where both
targets have a value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A mean over `n` values with its bootstrap interval [low, high] (NaN when n is 0)."""

    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def show(self, digits: int = 3) -> str:
        """"0.912 [0.874, 0.945]", or "n/a" without values."""
        if self.n == 0:
            return "n/a"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _present(values: Sequence[float | None]) -> np.ndarray:
    return np.array([v for v in values if v is not None], dtype=np.float64)


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_mean(
    values: Sequence[float | None], *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> Estimate:
    """The mean of the values that are not None, with a percentile bootstrap interval."""
    x = _present(values)
    if len(x) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    return Estimate(float(x.mean()), *_interval(means, confidence), len(x))


def paired_difference(
    a: Sequence[float | None], b: Sequence[float | None], *, resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE, seed: int = 0,
) -> Estimate:
    """mean(b - a) over the prompts where both have a value, with a paired bootstrap interval.

    `a[i]` and `b[i]` must be the same prompt's values under two targets.
    """
    if len(a) != len(b):
        raise ValueError(f"a paired difference needs values for the same prompts; got {len(a)} and {len(b)}")
    d = np.array([y - x for x, y in zip(a, b) if x is not None and y is not None], dtype=np.float64)
    if len(d) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    return Estimate(float(d.mean()), *_interval(means, confidence), len(d))
