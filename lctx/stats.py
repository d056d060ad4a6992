"""Small statistics shared by tasks and views: Wilson intervals for accuracies, bootstrap intervals over samples,
and Spearman's rank correlation.

Why here: tasks compute a cell's interval when they score it, and views recompute it when they pool cells
(every depth of a length), compare runs (the gate's noise) or correlate tasks; all must use the same formulas.
Everything is numpy only (scipy is optional in lctx's dependencies) and seeded, so a report is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054
BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there are no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def accuracy_metrics(correct: int, trials: int) -> dict[str, Any]:
    """``accuracy`` with its Wilson 95% interval and the counts it came from (so views can pool cells)."""
    low, high = wilson(correct, trials)
    return {"accuracy": correct / trials if trials else None, "ci_low": low, "ci_high": high,
            "correct": correct, "trials": trials}


def resample_indices(n: int, replicates: int = BOOTSTRAP_REPLICATES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``replicates`` × ``n`` indices drawn with replacement from a generator seeded with ``seed``."""
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """The percentile interval of the finite bootstrap replicates; None when fewer than half are finite."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size < max(1, replicates.size // 2):
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ratio(values: Sequence[float], weights: Sequence[float] | None = None, *, scale: float = 1.0,
                    exp: bool = False, replicates: int = BOOTSTRAP_REPLICATES,
                    seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of ``scale · Σ values / Σ weights`` (the mean without weights), optionally
    exponentiated (a perplexity from per-document NLL sums and token counts), resampling the samples (documents,
    trials, examples) with replacement. None with fewer than two samples (nothing to resample)."""
    v = np.asarray(values, dtype=float)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    if v.size < 2 or w.shape != v.shape or not (np.isfinite(v).all() and np.isfinite(w).all()):
        return None
    idx = resample_indices(v.size, replicates, seed)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        stat = scale * v[idx].sum(axis=1) / w[idx].sum(axis=1)
        if exp:
            stat = np.exp(stat)
    return percentile_interval(stat)


def ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their ranks (as Spearman's coefficient needs)."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    out = np.empty(x.size)
    start = 0
    for end in range(1, x.size + 1):
        if end == x.size or sorted_x[end] != sorted_x[start]:
            out[order[start:end]] = (start + end + 1) / 2  # mean of ranks start+1 .. end
            start = end
    return out


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on tie-averaged ranks); NaN when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values against {len(y)} y values")
    if len(x) < 2:
        return math.nan
    return _pearson(ranks(x), ranks(y))


def bootstrap_pairs(x: Sequence[float], y: Sequence[float], statistic: Callable[[Any, Any], float] = spearman, *,
                    replicates: int = BOOTSTRAP_REPLICATES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of ``statistic(x, y)`` resampling the (x, y) pairs; replicates where it
    is undefined (every resampled x equal, say) are left out. None with fewer than three pairs."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.size < 3:
        return None
    idx = resample_indices(xs.size, replicates, seed)
    stats = np.array([statistic(xs[row], ys[row]) for row in idx])
    return percentile_interval(stats)
