"""Statistics (ranks, Spearman, bootstrap), effective length by both thresholds with intervals, and the
perplexity ↔ task correlation, against naive references and hand-computed cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from lctx import results, stats
from lctx.cli import app
from lctx.view import analysis, summaries

WIDE = {"COLUMNS": "250"}  # rich reads the width per print: one table row per line


def naive_ranks(values: list[float]) -> list[float]:
    """Rank of each value: 1 + how many are smaller + (ties − 1) / 2."""
    return [1 + sum(v < x for v in values) + (sum(v == x for v in values) - 1) / 2 for x in values]


def naive_spearman(x: list[float], y: list[float]) -> float:
    """Without ties: 1 − 6 Σ d² / (n (n² − 1))."""
    n = len(x)
    d = [a - b for a, b in zip(naive_ranks(x), naive_ranks(y), strict=True)]
    return 1 - 6 * sum(v * v for v in d) / (n * (n * n - 1))


def test_ranks_average_ties_and_spearman_matches_the_textbook_formula() -> None:
    values = [3.0, 1.0, 3.0, 2.0, 3.0, 0.5]
    assert list(stats.ranks(values)) == naive_ranks(values) == [5, 2, 5, 3, 5, 1]
    rng = np.random.default_rng(3)
    for n in (4, 7, 12):
        x, y = list(rng.permutation(n) * 1.5), list(rng.normal(size=n))
        assert stats.spearman(x, y) == pytest.approx(naive_spearman(x, y))
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))  # a constant side: undefined
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = [1, 2, 2, 3, 5, 5, 5, 8], [2, 1, 4, 4, 3, 9, 9, 7]  # ties on both sides
    assert stats.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)


def test_bootstrap_is_seeded_and_matches_a_written_out_loop() -> None:
    values, weights = [2.0, 5.0, 1.0, 4.0, 3.5], [10, 40, 10, 30, 20]
    interval = stats.bootstrap_ratio(values, weights, exp=True)
    assert interval == stats.bootstrap_ratio(values, weights, exp=True)  # deterministic
    rng = np.random.default_rng(stats.BOOTSTRAP_SEED)
    draws = rng.integers(0, 5, size=(stats.BOOTSTRAP_REPLICATES, 5))
    replicates = [math.exp(sum(values[i] for i in row) / sum(weights[i] for i in row)) for row in draws]
    assert interval == pytest.approx(tuple(np.percentile(replicates, [2.5, 97.5])))
    point = math.exp(sum(values) / sum(weights))
    assert interval[0] < point < interval[1]
    mean = stats.bootstrap_ratio([0, 1, 1, 0, 1], scale=100)  # a score ×100 from per-example values
    assert 0 <= mean[0] < 60 < mean[1] <= 100
    assert stats.bootstrap_ratio([1.0]) is None  # one sample: nothing to resample
    assert stats.bootstrap_pairs([1, 2], [2, 1]) is None
    low, high = stats.bootstrap_pairs([1, 2, 3, 4, 5], [9, 7, 5, 3, 1])
    assert low == high == pytest.approx(-1.0)  # a monotone relation stays monotone in every resample


# ---- effective length --------------------------------------------------------------------------------------


def passkey(length: int, correct: int, trials: int = 20, rope: str = "none:logn=false", typed: str = "none",
            model: str = "m") -> dict:
    return {"schema": 2, "run_id": "r", "model": model, "rope": rope, "rope_input": typed, "task": "passkey",
            "task_spec": "passkey:samples=20", "length": length, "depth": 0.5, "train_len": 1024, "dtype": "float32",
            "attn": "sdpa", "config": {"samples": trials}, "status": "ok",
            "metrics": {"accuracy": correct / trials, "correct": correct, "trials": trials},
            "finished_at": "2026-01-01T00:00:00"}


def brute_force(lengths: list[int], keep) -> int | None:
    """The longest length L with keep(n) for every n ≤ L, by checking every prefix."""
    best = None
    for k in range(1, len(lengths) + 1):
        if all(keep(n) for n in lengths[:k]):
            best = lengths[k - 1]
    return best


def wilson(k: int, n: int) -> tuple[float, float]:
    z = 1.959963984540054
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def test_effective_lengths_by_both_thresholds_with_wilson_intervals() -> None:
    counts = {1024: 20, 2048: 19, 4096: 17, 8192: 12, 16384: 16}  # out of 20
    rows = summaries.effective_length([passkey(n, k) for n, k in counts.items()], threshold=85.6, relative=0.85)
    (row,) = rows
    lengths = sorted(counts)
    score = {n: counts[n] / 20 for n in lengths}
    bounds = {n: wilson(counts[n], 20) for n in lengths}
    assert row["effective_length"] == brute_force(lengths, lambda n: 100 * score[n] > 85.6) == 2048
    assert row["effective_interval"] == (brute_force(lengths, lambda n: 100 * bounds[n][0] > 85.6),
                                         brute_force(lengths, lambda n: 100 * bounds[n][1] > 85.6)) == (None, 4096)
    # relative: at least 85% of the variant's own score at 1k (100%): 17/20 = 85% keeps 4k, 12/20 stops at 8k
    assert row["relative_length"] == brute_force(lengths, lambda n: score[n] >= 0.85 * score[1024]) == 4096
    low, high = bounds[1024]
    assert row["relative_interval"] == (brute_force(lengths, lambda n: n == 1024 or bounds[n][0] >= 0.85 * high),
                                        brute_force(lengths, lambda n: n == 1024 or bounds[n][1] >= 0.85 * low))
    assert row["relative_interval"][0] <= row["relative_length"] <= row["relative_interval"][1]
    loose = summaries.effective_length([passkey(n, k) for n, k in counts.items()], relative=0.5)[0]
    assert loose["relative_length"] == 16384 and loose["effective_length"] == 2048  # 12/20 ≥ 50% of 100%
    # the text of the summary: both lengths with their intervals, as lctx results and the report print them
    (summary,) = summaries.effective_length_summaries([passkey(n, k) for n, k in counts.items()])
    assert row["relative_interval"] == (1024, 16384)  # 19/20's lower bound is under 85% of 20/20's upper one
    assert summary.rows[0][:6] == ["passkey", "none", "85.6", "2k [< 1k–4k]", "85%", "4k [1k–16k]"]


def test_relative_rule_is_undefined_without_a_base_and_a_failed_cell_ends_both() -> None:
    zero = summaries.effective_length([passkey(1024, 0), passkey(2048, 0)])[0]
    assert zero["relative_length"] is None and zero["effective_length"] is None
    failed = {**passkey(2048, 0), "status": "oom", "metrics": {}}
    row = summaries.effective_length([passkey(1024, 20), failed, passkey(4096, 20)])[0]
    assert row["effective_length"] == row["relative_length"] == 1024  # out of memory at 2k counts as failing


def test_lctx_results_prints_both_effective_lengths(tmp_path) -> None:
    store = results.Store(tmp_path)
    for n, k in {1024: 20, 2048: 19, 4096: 17, 8192: 12}.items():
        store.append(passkey(n, k))
    done = CliRunner().invoke(app, ["results", str(tmp_path), "--relative", "0.5"], env=WIDE)
    assert done.exit_code == 0, done.output
    line = next(x for x in done.output.splitlines() if x.strip().startswith("│ passkey") and "85.6" in x)
    assert "2k [< 1k–4k]" in line and " 50% " in line and " 8k " in line
    done = CliRunner().invoke(app, ["results", str(tmp_path), "--relative", "1.5"], env=WIDE)
    assert done.exit_code == 2  # a share is at most 1


# ---- perplexity ↔ task scores -------------------------------------------------------------------------------


def ppl(length: int, value: float, rope: str, typed: str, samples: int = 1) -> dict:
    return {"schema": 2, "run_id": "r", "model": "m", "rope": rope, "rope_input": typed, "task": "ppl",
            "task_spec": "ppl:samples=1", "length": length, "depth": None, "train_len": 1024, "dtype": "float32",
            "attn": "sdpa", "config": {"samples": samples}, "status": "ok", "metrics": {"ppl": value},
            "finished_at": "2026-01-01T00:00:00"}


ROPES = [("none:logn=false", "none"), ("pi:factor=2:logn=false", "pi:factor=2"), ("yarn:factor=2:x=1", "yarn")]


def grid(score) -> list[dict]:
    """ppl and passkey records on 3 variants × 3 lengths; passkey correct counts from ``score(ppl)``."""
    out = []
    for k, (rope, typed) in enumerate(ROPES):
        for j, n in enumerate((1024, 2048, 4096)):
            value = 5.0 + 3 * j + k * (1 + j)
            out += [ppl(n, value, rope, typed), passkey(n, score(value), rope=rope, typed=typed)]
    return out


def test_correlation_is_spearman_over_the_shared_cells_with_a_bootstrap_interval() -> None:
    monotone = analysis.correlations(grid(lambda v: max(0, 20 - int(v))))
    (c,) = monotone
    assert c.task.task == "passkey" and len(c.points) == 9
    assert c.rho == pytest.approx(-1.0) and c.interval == pytest.approx((-1.0, -1.0))
    assert c.reading == "lower perplexity goes with higher scores"
    mixed = grid(lambda v: [20, 3, 17, 9, 12, 1, 15, 6, 11][int(v) % 9])
    (c,) = analysis.correlations(mixed)
    xs, ys = [p[2] for p in c.points], [p[3] for p in c.points]
    assert c.rho == pytest.approx(np.corrcoef(naive_ranks(xs), naive_ranks(ys))[0, 1])  # Pearson of the ranks
    assert -1 < c.interval[0] <= c.rho <= c.interval[1] < 1
    # points are exactly the (variant, length) cells both tasks have: drop some and they leave the panel
    fewer = [r for r in mixed if not (r["task"] == "passkey" and r["length"] == 4096)]
    assert len(analysis.correlations(fewer)[0].points) == 6
    too_few = [r for r in mixed if r["length"] == 1024]  # 3 points: no panel
    assert analysis.correlations(too_few) == []
    other_model = [{**r, "model": "other"} if r["task"] == "passkey" else r for r in mixed]
    assert analysis.correlations(other_model) == []
    (summary,) = analysis.correlation_summaries(mixed)
    assert summary.kind == "correlation" and summary.rows[0][:3] == ["passkey", "ppl", "9"]


def test_every_ordering_of_four_points_gives_the_naive_spearman() -> None:
    """An exhaustive check: every permutation of scores against four perplexities."""
    xs = [3.0, 5.0, 8.0, 13.0]
    for perm in itertools.permutations([0.1, 0.4, 0.6, 0.9]):
        assert stats.spearman(xs, list(perm)) == pytest.approx(naive_spearman(xs, list(perm)))
