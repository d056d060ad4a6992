"""Small statistics shared by tasks and views: Wilson intervals for accuracies.

Why here: tasks compute a cell's interval when they score it, and views recompute it when they pool cells
(every depth of a length); both must use the same formula.
"""

from __future__ import annotations

import math
from typing import Any

Z95 = 1.959963984540054


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
