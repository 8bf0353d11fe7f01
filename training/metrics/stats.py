"""Uncertainty for evaluation metrics: bootstrap confidence intervals and a paired A/B test on the same studies.

Conventions
- A metric is a callable over an index array into a list of items (studies, or generated reports): `metric(idx)`
  returns the metric computed on the items `idx` (with repeats, as a bootstrap resample has). Corpus-level metrics
  (micro-F1, BLEU) are recomputed on each resample / permutation, never averaged per sample.
- `SummedStats` is the fast form of such a metric: per-sample sufficient statistics (N, K) whose column sums determine
  the metric (BLEU: n-gram matches, totals and lengths; F1: true/false positive and false negative counts; a mean:
  value and 1). Resampling then is a (B, N) weight matrix times (N, K): 1000 resamples of 200 studies take
  milliseconds. Any other callable runs one Python call per resample (B calls).
- Paired functions take a *pooled* metric over 2n items: items 0..n-1 are arm A's outputs for studies 0..n-1, items
  n..2n-1 are arm B's outputs for the same studies in the same order (`SummedStats.concat(a, b)` builds it).
- Intervals are percentile intervals; `estimate` is the metric on the full set (not the mean of the resamples).
- Everything is deterministic given `seed` (numpy's default_rng). The SummedStats path and the generic path draw the
  same resamples, so they give identical results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# (..., K) summed statistics -> (...) metric values.
Finalize = Callable[[np.ndarray], np.ndarray]


class IndexMetric(Protocol):
    def __call__(self, idx: np.ndarray) -> float: ...


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare values instead
class SummedStats:
    """A metric that is a function of per-sample statistics summed over the samples.

    `per_sample` is (N, K); `finalize` maps summed statistics (..., K) to metric values (...), vectorized over the
    leading axes. Calling it on indices sums the selected rows (with repeats) and finalizes.
    """

    per_sample: np.ndarray  # (N, K)
    finalize: Finalize

    def __post_init__(self) -> None:
        per_sample = np.asarray(self.per_sample, dtype=np.float64)
        if per_sample.ndim != 2:
            raise ValueError(f"per_sample must be (N, K), got shape {per_sample.shape}")
        object.__setattr__(self, "per_sample", per_sample)

    def __len__(self) -> int:
        return self.per_sample.shape[0]

    def __call__(self, idx: np.ndarray | None = None) -> float:
        """The metric on the items `idx` (all items when None)."""
        rows = self.per_sample if idx is None else self.per_sample[np.asarray(idx, dtype=np.int64)]
        return float(self.finalize(rows.sum(axis=0)))

    @property
    def value(self) -> float:
        """The metric on all items."""
        return self()

    def from_weights(self, weights: np.ndarray) -> np.ndarray:
        """Metric values for a (B, N) matrix of per-item multiplicities (resample counts, 0/1 choices) -> (B,)."""
        return np.asarray(self.finalize(np.asarray(weights, dtype=np.float64) @ self.per_sample), dtype=np.float64)

    @staticmethod
    def concat(a: SummedStats, b: SummedStats) -> SummedStats:
        """The pooled metric of two arms (a's items first). Both must be the same metric (a's finalize is used)."""
        if a.per_sample.shape[1] != b.per_sample.shape[1]:
            raise ValueError(f"arms have different statistics: K={a.per_sample.shape[1]} vs {b.per_sample.shape[1]}")
        return SummedStats(np.concatenate([a.per_sample, b.per_sample]), a.finalize)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    n_resamples: int


@dataclass(frozen=True)
class RandomizationTest:
    """Approximate randomization: observed metric(A) - metric(B) and its two-sided p-value (with +1 smoothing)."""

    observed_diff: float
    p_value: float
    n_permutations: int


@dataclass(frozen=True)
class ABComparison:
    """Everything an A/B report needs for one metric: each arm's interval, the paired difference, the p-value."""

    a: Interval
    b: Interval
    diff: Interval  # metric(A) - metric(B), paired bootstrap
    test: RandomizationTest


# --------------------------------------------------------------------------------------------- helpers
def _n_items(metric: IndexMetric, n: int | None, what: str) -> int:
    if n is None:
        if not hasattr(metric, "__len__"):
            raise ValueError(f"{what}: pass n (the number of items) for a metric without len()")
        n = len(metric)  # type: ignore[arg-type]
    if n < 1:
        raise ValueError(f"{what}: need at least one item, got n={n}")
    return n


def _n_studies(pooled: IndexMetric, n: int | None, what: str) -> int:
    if n is None:
        total = _n_items(pooled, None, what)
        if total % 2:
            raise ValueError(f"{what}: a pooled metric has 2n items (arm A then arm B), got {total}")
        n = total // 2
    if n < 1:
        raise ValueError(f"{what}: need at least one study, got n={n}")
    return n


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(B, n) resample indices -> (B, n) multiplicities, one bincount for all rows."""
    b = idx.shape[0]
    flat = (idx + (np.arange(b) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _interval(estimate: float, values: np.ndarray, confidence: float) -> Interval:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    defined = values[np.isfinite(values)]  # a resample can leave a metric undefined (an F1 with no positives)
    if defined.size == 0:
        return Interval(float(estimate), math.nan, math.nan, confidence, int(values.shape[0]))
    low, high = np.quantile(defined, [alpha / 2, 1 - alpha / 2])
    return Interval(float(estimate), float(low), float(high), confidence, int(values.shape[0]))


# --------------------------------------------------------------------------------------------- public API
def bootstrap_ci(
    metric: IndexMetric,
    n: int | None = None,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of `metric` over n items (studies), resampled with replacement.

    `n` defaults to len(metric). The metric is recomputed on every resample (corpus-level metrics stay corpus-level).
    """
    n = _n_items(metric, n, "bootstrap_ci")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))  # (B, n)
    if isinstance(metric, SummedStats):
        values = metric.from_weights(_counts(idx, n))
    else:
        values = np.array([metric(row) for row in idx], dtype=np.float64)
    return _interval(metric(np.arange(n)), values, confidence)


def paired_bootstrap_diff(
    pooled: IndexMetric,
    n: int | None = None,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Paired bootstrap interval of metric(A) - metric(B): both arms are evaluated on the same resampled studies.

    `pooled` is over 2n items (arm A's n outputs, then arm B's for the same studies); n defaults to len(pooled) // 2.
    """
    n = _n_studies(pooled, n, "paired_bootstrap_diff")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))  # (B, n) study indices, shared by both arms
    if isinstance(pooled, SummedStats):
        counts = _counts(idx, n)
        zeros = np.zeros_like(counts)
        values = pooled.from_weights(np.hstack([counts, zeros])) - pooled.from_weights(np.hstack([zeros, counts]))
    else:
        values = np.array([pooled(row) - pooled(row + n) for row in idx], dtype=np.float64)
    studies = np.arange(n)
    return _interval(pooled(studies) - pooled(studies + n), values, confidence)


def paired_randomization_test(
    pooled: IndexMetric,
    n: int | None = None,
    *,
    n_permutations: int = 1000,
    seed: int = 0,
) -> RandomizationTest:
    """Approximate randomization test of H0 "the arms are exchangeable per study" (two-sided).

    Each permutation swaps the two arms' outputs of each study with probability 0.5 and recomputes
    metric(A') - metric(B') on the full set. p = (1 + #{|d_perm| >= |d_obs|}) / (1 + n_permutations), so p is never 0
    and the test is valid (slightly conservative) at any number of permutations.
    """
    n = _n_studies(pooled, n, "paired_randomization_test")
    rng = np.random.default_rng(seed)
    swap = rng.random((n_permutations, n)) < 0.5  # (P, n)
    studies = np.arange(n)
    observed = pooled(studies) - pooled(studies + n)
    if not np.isfinite(observed):
        raise ValueError(f"paired_randomization_test: the metric difference on the full set is {observed}")
    if isinstance(pooled, SummedStats):
        keep, swapped = (~swap).astype(np.float64), swap.astype(np.float64)
        diffs = pooled.from_weights(np.hstack([keep, swapped])) - pooled.from_weights(np.hstack([swapped, keep]))
    else:
        idx_a = np.where(swap, studies + n, studies)
        idx_b = np.where(swap, studies, studies + n)
        diffs = np.array([pooled(a) - pooled(b) for a, b in zip(idx_a, idx_b, strict=True)], dtype=np.float64)
    # Float tolerance: a permutation that reproduces the observed split must count as "as extreme".
    tol = 1e-12 * max(1.0, abs(observed))
    extreme = int(np.count_nonzero(np.abs(diffs) >= abs(observed) - tol))
    return RandomizationTest(float(observed), (1 + extreme) / (1 + n_permutations), n_permutations)


def compare_arms(
    a: SummedStats,
    b: SummedStats,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ABComparison:
    """Intervals for each arm, the paired bootstrap interval of A - B and the randomization p-value, for one metric.

    `a` and `b` are the same metric built from each arm's outputs on the same studies, in the same order.
    `n_resamples` is used for the bootstraps and as the number of randomization permutations.
    """
    if len(a) != len(b):
        raise ValueError(f"arms must score the same studies: {len(a)} vs {len(b)} items")
    pooled = SummedStats.concat(a, b)
    return ABComparison(
        a=bootstrap_ci(a, n_resamples=n_resamples, confidence=confidence, seed=seed),
        b=bootstrap_ci(b, n_resamples=n_resamples, confidence=confidence, seed=seed),
        diff=paired_bootstrap_diff(pooled, n_resamples=n_resamples, confidence=confidence, seed=seed),
        test=paired_randomization_test(pooled, n_permutations=n_resamples, seed=seed),
    )


def holm_adjust(p_values: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values for one family of tests (one A/B table), in the input order.

    Sort the m defined p-values ascending, multiply the k-th smallest (k = 0..m-1) by (m - k), take the running maximum
    (adjusted values never decrease along the sorted order) and cap at 1. Rejecting where the adjusted value <= alpha
    controls the family-wise error rate at alpha under any dependence between the tests (the metrics of one table are
    strongly dependent). Undefined p-values (NaN: an undefined comparison) stay NaN and do not count in m.
    """
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    out = np.full_like(p, np.nan)
    defined = np.flatnonzero(np.isfinite(p))
    if defined.size == 0:
        return out
    order = defined[np.argsort(p[defined], kind="stable")]
    m = order.size
    adjusted = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out[order] = np.minimum(adjusted, 1.0)
    return out
