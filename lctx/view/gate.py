"""The regression gate: compare the cells of a run against a baseline run, direction-aware.

Cells match on model, variant (canonical spec), task, metric and length, within the same settings (training
length, dtype, attention, task options: what makes two records the same cell in the store). Retrieval cells
pool their depths. A cell regresses when its metric worsens by more than the tolerance (relative ``2%`` of the
baseline value, or an absolute amount in the metric's unit), or when it was ok in the baseline and is now out
of memory or an error. Cells present on one side only are listed, never skipped silently.
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

    @property
    def higher_is_better(self) -> bool | None:
        return self.metric.higher_is_better

    def delta(self) -> str:
        b, c = self.baseline, self.current
        if not (b.finite and c.finite):
            return self.reason
        diff = c.value - b.value
        relative = f" ({100 * diff / abs(b.value):+.1f}%)" if b.value else ""
        return f"{diff:+.4g}{relative}"


@dataclass
class GateResult:
    tolerance: Tolerance
    compared: int = 0
    regressions: list[Change] = field(default_factory=list)
    improvements: list[Change] = field(default_factory=list)
    missing_in_current: list[tuple[CellKey, str]] = field(default_factory=list)  # (cell, variant label)
    missing_in_baseline: list[tuple[CellKey, str]] = field(default_factory=list)

    def passed(self, fail_on_missing: bool = False) -> bool:
        return not self.regressions and not (fail_on_missing and self.missing_in_current)

    def verdict(self, fail_on_missing: bool = False) -> str:
        if self.passed(fail_on_missing):
            return (f"passed: {self.compared} cells compared, no regression beyond {self.tolerance}"
                    + (f"; {len(self.missing_in_current)} baseline cells missing" if self.missing_in_current else ""))
        if self.regressions:
            return f"FAILED: {len(self.regressions)} of {self.compared} cells regressed beyond {self.tolerance}"
        return f"FAILED: {len(self.missing_in_current)} baseline cells missing from the results (--fail-on-missing)"

    def rows(self, changes: list[Change]) -> list[list[str]]:
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
        for title, changes in (("Regressions", self.regressions), ("Improvements", self.improvements)):
            if changes:
                parts.append(f"### {title} ({len(changes)})\n\n" + _markdown(header, self.rows(changes), limit))
        miss_header = ["task", "metric", "model", "variant", "length", "settings"]
        for title, cells in (("In the baseline, missing from the results", self.missing_in_current),
                             ("New in the results (not in the baseline)", self.missing_in_baseline)):
            if cells:
                parts.append(f"### {title} ({len(cells)})\n\n"
                             + _markdown(miss_header, self.missing_rows(cells), limit))
        return "\n\n".join(parts) + "\n"


def _markdown(header: list[str], rows: list[list[str]], limit: int | None = None) -> str:
    shown = rows if limit is None else rows[:limit]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in shown]
    if len(shown) < len(rows):
        lines.append(f"\n… and {len(rows) - len(shown)} more (gate.md in the report lists every one).")
    return "\n".join(lines)


def _cells(table_list: list[Table]) -> dict[CellKey, tuple[Value | None, str, Metric]]:
    out = {}
    for table in table_list:
        g = table.group
        settings = f"train_len {g.train_len} · {g.settings}"
        for i, rope in enumerate(table.ropes):
            for j, (length, _) in enumerate(table.columns):
                key = CellKey(g.model, rope, g.task, table.metric.name, length, settings)
                out[key] = (table.cells[i][j], table.variants[i], table.metric)
    return out


def _judge(base: Value, current: Value, higher: bool | None, tolerance: Tolerance) -> tuple[int, str]:
    """-1 regression, 1 improvement, 0 within tolerance (or nothing to compare, or no known direction)."""
    if higher is None:
        return 0, ""
    rank = {"ok": 0, "oom": 1, "error": 2}
    b, c = rank.get(base.status, 2), rank.get(current.status, 2)
    if b != c:
        return (-1 if c > b else 1), f"{base.status} → {current.status}"
    if base.status != "ok" or base.value is None or (isinstance(base.value, float) and math.isnan(base.value)):
        return 0, ""
    if current.value is None or math.isnan(current.value):
        return -1, "no value"
    worse = (base.value - current.value) if higher else (current.value - base.value)
    if math.isinf(base.value) and math.isinf(current.value) and base.value == current.value:
        return 0, ""
    allowed = tolerance.allowed(base.value) if math.isfinite(base.value) else 0.0
    if worse > allowed + 1e-12 * max(1.0, abs(base.value) if math.isfinite(base.value) else 1.0):
        return -1, "worse"
    if -worse > allowed:
        return 1, "better"
    return 0, ""


def compare(current: Iterable[dict[str, Any]], baseline: Iterable[dict[str, Any]],
            tolerance: Tolerance) -> GateResult:
    """Match the two record sets' table cells and sort them into regressions, improvements and missing."""
    now = _cells(tables_mod.build(current))
    before = _cells(tables_mod.build(baseline))
    result = GateResult(tolerance)
    for key, (base_value, label, metric) in before.items():
        if key not in now or now[key][0] is None:
            if base_value is not None:
                result.missing_in_current.append((key, label))
            continue
        if base_value is None:
            continue
        current_value, label, metric = now[key]
        result.compared += 1
        verdict, reason = _judge(base_value, current_value, metric.higher_is_better, tolerance)
        if verdict:
            change = Change(key, label, base_value, current_value, metric, reason)
            (result.regressions if verdict < 0 else result.improvements).append(change)
    result.missing_in_baseline = [(key, label) for key, (value, label, _) in now.items()
                                  if value is not None and (key not in before or before[key][0] is None)]
    return result
