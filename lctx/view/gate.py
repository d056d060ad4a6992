"""The regression gate: compare the cells of a run against a baseline run, direction-aware and noise-aware.

Cells match on model, variant (canonical spec), task, metric and length, within the same settings (training
length, dtype, attention, task options: what makes two records the same cell in the store). Retrieval cells
pool their depths. A cell regresses when it was ok in the baseline and is now out of memory or an error, or when
its metric worsens by more than the larger of

- the **tolerance** (relative ``2%`` of the baseline value, or an absolute amount in the metric's unit): the
  floor, and
- the **noise** of the change (``noise=True``, the default): the half-width of its 95% interval from the two
  cells' own intervals, the baseline's towards worse and the current's towards better combined in quadrature
  (independent runs): Wilson intervals of accuracies, bootstrap intervals over documents or examples for
  perplexity and scores (:meth:`lctx.view.frame.Group.value`). A cell without an interval has no noise. So a
  passkey cell flipping one trial of five is not a regression, and a perplexity drift within the spread of its
  documents is not either.

Improvements are judged the same way. Changes past the tolerance but within the noise are listed apart ("within
noise"). Cells present on one side only are listed, never skipped silently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lctx.evals import Metric
from lctx.spec import format_length
from lctx.view import tables as tables_mod
from lctx.view.frame import Value
from lctx.view.tables import Table, cell_text

TOLERANCE_FORMS = "a percentage of the baseline value (2%, 0.5%) or an absolute amount in the metric's unit (0.05)"


@dataclass(frozen=True)
class Tolerance:
    amount: float
    relative: bool

    def allowed(self, baseline: float) -> float:
        return abs(baseline) * self.amount if self.relative else self.amount

    def __str__(self) -> str:
        return f"{100 * self.amount:g}%" if self.relative else f"{self.amount:g} (absolute)"


def parse_tolerance(text: str) -> Tolerance:
    """``2%`` (relative to the baseline value) or ``0.05`` (absolute); never negative."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*", str(text))
    if not match:
        raise ValueError(f"invalid tolerance {text!r}: use {TOLERANCE_FORMS}")
    amount = float(match.group(1))
    return Tolerance(amount / 100, True) if match.group(2) else Tolerance(amount, False)


@dataclass(frozen=True)
class CellKey:
    model: str
    rope: str
    task: str
    metric: str
    length: int
    settings: str  # training length, dtype/attn and task options, as a label


@dataclass
class Change:
    """A matched cell whose value moved past the tolerance (or whose status changed)."""

    key: CellKey
    variant: str  # label as typed
    baseline: Value
    current: Value
    metric: Metric
    reason: str
    noise: float = 0.0  # the change's 95% half-width from the cells' intervals (0: none known)

    @property
    def higher_is_better(self) -> bool | None:
        return self.metric.higher_is_better

    def delta(self) -> str:
        b, c = self.baseline, self.current
        if not (b.finite and c.finite):
            return self.reason
        diff = c.value - b.value
        relative = f" ({100 * diff / abs(b.value):+.1f}%)" if b.value else ""
        noise = f" (noise ±{self.noise:.3g})" if self.noise else ""
        return f"{diff:+.4g}{relative}{noise}"


@dataclass
class GateResult:
    tolerance: Tolerance
    noise: bool = True
    compared: int = 0
    regressions: list[Change] = field(default_factory=list)
    improvements: list[Change] = field(default_factory=list)
    within_noise: list[Change] = field(default_factory=list)  # past the tolerance, inside the noise
    missing_in_current: list[tuple[CellKey, str]] = field(default_factory=list)  # (cell, variant label)
    missing_in_baseline: list[tuple[CellKey, str]] = field(default_factory=list)

    def passed(self, fail_on_missing: bool = False) -> bool:
        return not self.regressions and not (fail_on_missing and self.missing_in_current)

    @property
    def rule(self) -> str:
        return f"{self.tolerance}" + (" or the change's 95% noise, whichever is larger" if self.noise else "")

    def verdict(self, fail_on_missing: bool = False) -> str:
        quiet = f"; {len(self.within_noise)} changed within noise" if self.within_noise else ""
        if self.passed(fail_on_missing):
            return (f"passed: {self.compared} cells compared, no regression beyond {self.rule}{quiet}"
                    + (f"; {len(self.missing_in_current)} baseline cells missing" if self.missing_in_current else ""))
        if self.regressions:
            return (f"FAILED: {len(self.regressions)} of {self.compared} cells regressed beyond {self.rule}"
                    f"{quiet}")
        return f"FAILED: {len(self.missing_in_current)} baseline cells missing from the results (--fail-on-missing)"

    @staticmethod
    def rows(changes: list[Change]) -> list[list[str]]:
        """Table rows: task, metric, model, variant, length, baseline, current, change."""
        return [[c.key.task, f"{c.key.metric} {'↑' if c.higher_is_better else '↓'}", c.key.model, c.variant,
                 format_length(c.key.length), cell_text(c.baseline, c.metric),
                 cell_text(c.current, c.metric), c.delta()] for c in changes]

    @staticmethod
    def missing_rows(cells: list[tuple[CellKey, str]]) -> list[list[str]]:
        return [[k.task, k.metric, k.model, label, format_length(k.length), k.settings] for k, label in cells]

    def to_markdown(self, fail_on_missing: bool = False, limit: int | None = None) -> str:
        """The verdict and every list; with ``limit``, at most that many rows per list (the rest counted)."""
        icon = "✅" if self.passed(fail_on_missing) else "❌"
        parts = [f"## Regression gate {icon}\n\n{self.verdict(fail_on_missing)}."]
        header = ["task", "metric", "model", "variant", "length", "baseline", "current", "change"]
        for title, changes in (("Regressions", self.regressions), ("Improvements", self.improvements),
                               ("Within noise (past the tolerance, inside the cells' 95% noise)", self.within_noise)):
            if changes:
                parts.append(f"### {title} ({len(changes)})\n\n" + markdown_table(header, self.rows(changes), limit))
        miss_header = ["task", "metric", "model", "variant", "length", "settings"]
        for title, cells in (("In the baseline, missing from the results", self.missing_in_current),
                             ("New in the results (not in the baseline)", self.missing_in_baseline)):
            if cells:
                parts.append(f"### {title} ({len(cells)})\n\n"
                             + markdown_table(miss_header, self.missing_rows(cells), limit))
        return "\n\n".join(parts) + "\n"


def markdown_table(header: list[str], rows: list[list[str]], limit: int | None = None) -> str:
    """A Markdown table of texts (pipes escaped); with ``limit``, the first rows and a count of the rest."""
    shown = rows if limit is None else rows[:limit]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in shown]
    if len(shown) < len(rows):
        lines.append(f"\n… and {len(rows) - len(shown)} more (gate.md in the report lists every one).")
    return "\n".join(lines)


def cells(table_list: list[Table]) -> dict[CellKey, tuple[Value | None, str, Metric]]:
    """Every table cell by its key, with its variant label and metric."""
    out = {}
    for table in table_list:
        g = table.group
        settings = f"train_len {g.train_len} · {g.settings}"
        for i, rope in enumerate(table.ropes):
            for j, (length, _) in enumerate(table.columns):
                key = CellKey(g.model, rope, g.task, table.metric.name, length, settings)
                out[key] = (table.cells[i][j], table.variants[i], table.metric)
    return out


def change_noise(base: Value, current: Value, higher: bool, worse: bool = True) -> float:
    """The 95% half-width of the change from ``base`` to ``current`` in the direction asked (``worse``, or
    better): each cell's interval side that way, combined in quadrature; 0 when neither cell has an interval."""
    def side(value: Value, up: bool) -> float:
        bound = value.high if up else value.low
        if bound is None or value.value is None or not math.isfinite(bound):
            return 0.0
        return abs(bound - value.value)

    down = worse == higher  # the current value lies below the baseline's: a worse change of a higher-is-better metric
    return math.hypot(side(base, not down), side(current, down))


def judge(base: Value, current: Value, higher: bool | None, tolerance: Tolerance,
          with_noise: bool = True) -> tuple[int, str, float]:
    """-1 regression, 1 improvement, 0 within tolerance (or nothing to compare, or no known direction), with
    the reason and the noise that widened the tolerance ("within noise": past the tolerance, not the noise)."""
    if higher is None:
        return 0, "", 0.0
    rank = {"ok": 0, "oom": 1, "error": 2}
    b, c = rank.get(base.status, 2), rank.get(current.status, 2)
    if b != c:
        return (-1 if c > b else 1), f"{base.status} → {current.status}", 0.0
    if base.status != "ok" or base.value is None or (isinstance(base.value, float) and math.isnan(base.value)):
        return 0, "", 0.0
    if current.value is None or math.isnan(current.value):
        return -1, "no value", 0.0
    worse = (base.value - current.value) if higher else (current.value - base.value)
    if math.isinf(base.value) and math.isinf(current.value) and base.value == current.value:
        return 0, "", 0.0
    floor = tolerance.allowed(base.value) if math.isfinite(base.value) else 0.0
    slack = 1e-12 * max(1.0, abs(base.value) if math.isfinite(base.value) else 1.0)
    if worse > floor + slack or -worse > floor:
        spread = change_noise(base, current, higher, worse=worse > 0) if with_noise and math.isfinite(worse) else 0.0
        if abs(worse) <= spread:
            return 0, "within noise", spread
        return (-1, "worse", spread) if worse > 0 else (1, "better", spread)
    return 0, "", 0.0


def compare(current: Iterable[dict[str, Any]], baseline: Iterable[dict[str, Any]],
            tolerance: Tolerance, noise: bool = True) -> GateResult:
    """Match the two record sets' table cells and sort them into regressions, improvements, changes within noise
    and missing cells."""
    now = cells(tables_mod.build(current))
    before = cells(tables_mod.build(baseline))
    result = GateResult(tolerance, noise)
    for key, (base_value, label, metric) in before.items():
        if key not in now or now[key][0] is None:
            if base_value is not None:
                result.missing_in_current.append((key, label))
            continue
        if base_value is None:
            continue
        current_value, label, metric = now[key]
        result.compared += 1
        verdict, reason, spread = judge(base_value, current_value, metric.higher_is_better, tolerance, noise)
        change = Change(key, label, base_value, current_value, metric, reason, spread)
        if verdict:
            (result.regressions if verdict < 0 else result.improvements).append(change)
        elif reason == "within noise":
            result.within_noise.append(change)
    result.missing_in_baseline = [(key, label) for key, (value, label, _) in now.items()
                                  if value is not None and (key not in before or before[key][0] is None)]
    return result
