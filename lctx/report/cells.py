"""The report's view of records: headline metrics and their direction, variant labels, and numeric cells.

Tables, figures and the regression gate all read cells through this module, so they can never disagree about
which metric a task is judged by, which way is better, or how the depths of a retrieval cell are pooled.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from lctx import results

# metric names whose smaller values are better; every other metric is taken as higher-is-better
LOWER_IS_BETTER = ("ppl", "perplexity", "nll", "loss")
# headline for tasks the registry does not know, in order of preference
PREFERRED = ("ppl", "accuracy", "score", "acc", "acc_norm", "exact_match", "em", "f1")
# scalar metrics that describe a cell's size or uncertainty, never a headline
BOOKKEEPING = {"ci_low", "ci_high", "correct", "trials", "tokens", "last_k_tokens"}
# a table (and a figure) covers records sharing these fields; the config is results.frame's label
GROUP_FIELDS = ("task", "model", "train_len", "dtype", "attn", "config")
_FIXED = {*results.KEY_FIELDS, "rope_input", "status", "seconds"}


def revive(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records with non-finite metrics as floats again: the store writes inf/NaN as the strings "inf"/"nan"."""

    def number(value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ("inf", "-inf", "nan", "infinity", "-infinity"):
            return float(value)
        if isinstance(value, list):
            return [number(v) for v in value]
        return value

    return [{**r, "metrics": {k: number(v) for k, v in (r.get("metrics") or {}).items()}} for r in records]


@functools.cache
def registered_task(name: str) -> Any | None:
    """The task object a record's task name stands for, or None for names lctx does not (or no longer) know."""
    from lctx import evals

    try:
        tasks = evals.expand(name)
    except Exception:  # noqa: BLE001 - an unknown or retired task in old records must not stop a report
        return None
    return tasks[0] if len(tasks) == 1 else None


def lower_is_better(metric: str) -> bool:
    """Direction from the name alone: perplexities, NLLs and losses shrink as models improve."""
    name = metric.lower()
    return any(word in name for word in LOWER_IS_BETTER)


def higher_is_better(task: str, metric: str) -> bool:
    """The task's own direction for its headline metric; the name rule for anything else."""
    found = registered_task(task)
    if found is not None and getattr(found, "metric", None) == metric:
        return bool(getattr(found, "higher_is_better", not lower_is_better(metric)))
    return not lower_is_better(metric)


def table_metrics(task: str, available: Iterable[str]) -> list[str]:
    """Metrics to tabulate for a task: its declared headline (and results.headline's, e.g. the last-k
    perplexity), else a well-known metric the records have, else their first non-bookkeeping metric."""
    available = list(dict.fromkeys(available))
    found = registered_task(task)
    declared = getattr(found, "metric", None)
    known = results.headline(task) if found is not None or task in results.HEADLINE else ()
    candidates = [m for m in dict.fromkeys([declared, *known]) if m]
    chosen = [m for m in candidates if m in available]
    if chosen:
        return chosen
    for metric in PREFERRED:
        if metric in available:
            return [metric]
    rest = [m for m in available if m not in BOOKKEEPING and not m.endswith("_stderr")]
    if rest:
        return [rest[0]]
    return candidates[:1] or ["value"]  # nothing was measured (every cell failed): the table shows statuses


def variant_labels(records: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Canonical rope -> label: the spec as typed, unless one typed spec resolved to several canonical forms."""
    typed: dict[str, str] = {}
    for record in records:
        typed.setdefault(record["rope"], record.get("rope_input") or record["rope"])
    count = Counter(typed.values())
    return {rope: label if count[label] == 1 else rope for rope, label in typed.items()}


def family(task: str) -> str:
    """The section a task belongs to: ``longbench:qasper`` -> ``longbench``; ``ppl`` -> ``ppl``."""
    return task.split(":", 1)[0]


@dataclass(frozen=True)
class Value:
    """One cell: a number (None when there is none), its status (ok | oom | error), and a 95% interval."""

    value: float | None
    status: str
    low: float | None = None
    high: float | None = None

    @property
    def finite(self) -> bool:
        return self.status == "ok" and self.value is not None and math.isfinite(self.value)


def pool(part: pd.DataFrame, metric: str) -> Value:
    """The value of a (variant, length) cell from its records (one per depth for retrieval tasks).

    Any error makes the cell an error, else any OOM an OOM. Accuracy pools the trials of every depth (Wilson
    interval recomputed) when the records count them; other metrics are averaged over depths.
    """
    from lctx.evals.passkey import wilson

    statuses = set(part["status"])
    if statuses - {"ok", "oom"}:
        return Value(None, "error")
    if "oom" in statuses:
        return Value(None, "oom")
    counted = {"correct", "trials"} <= set(part.columns) and bool(part[["correct", "trials"]].notna().all(axis=None))
    if metric == "accuracy" and counted and part["trials"].sum() > 0:
        correct, trials = int(part["correct"].sum()), int(part["trials"].sum())
        low, high = wilson(correct, trials)
        return Value(correct / trials, "ok", low, high)
    if metric not in part or part[metric].isna().all():
        return Value(None, "ok")
    value = float(part[metric].dropna().astype(float).mean())
    if metric == "accuracy" and len(part) == 1 and {"ci_low", "ci_high"} <= set(part.columns):
        low, high = part["ci_low"].iloc[0], part["ci_high"].iloc[0]
        if pd.notna(low) and pd.notna(high):  # one record that brings its own interval
            return Value(value, "ok", float(low), float(high))
    return Value(value, "ok")


@dataclass
class Group:
    """Records of one task for one model under one configuration: what a table or a figure panel covers."""

    task: str
    model: str
    train_len: int | None
    dtype: str
    attn: str
    config: str
    frame: pd.DataFrame  # results.frame rows
    records: list[dict[str, Any]]  # the same records, for list-valued metrics (per-position losses)

    @property
    def settings(self) -> str:
        return f"{self.dtype}/{self.attn}" + (f" · {self.config}" if self.config else "")

    @property
    def metrics(self) -> list[str]:
        """Scalar metrics that at least one record of the group has, in record order."""
        return [c for c in self.frame.columns if c not in _FIXED and self.frame[c].notna().any()]

    @property
    def ropes(self) -> list[str]:
        return list(dict.fromkeys(self.frame["rope"]))

    @property
    def lengths(self) -> list[int]:
        return sorted({int(n) for n in self.frame["length"]})

    @property
    def has_depths(self) -> bool:
        return bool(self.frame["depth"].notna().any())

    def value(self, rope: str, length: int, metric: str, depth: float | None = None) -> Value | None:
        """The cell's value, pooled over depths unless one is given; None when no record covers it."""
        rows = self.frame[(self.frame["rope"] == rope) & (self.frame["length"] == length)]
        if depth is not None:
            rows = rows[rows["depth"] == depth]
        return pool(rows, metric) if len(rows) else None


def _none(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def groups(records: Iterable[dict[str, Any]]) -> list[Group]:
    """Records split by (task, model, training length, dtype, attention, task options), in record order."""
    records = revive(records)
    if not records:
        return []
    df = results.frame(records)
    df["_index"] = range(len(df))
    out = []
    for keys, part in df.groupby(list(GROUP_FIELDS), sort=False, dropna=False):
        task, model, train_len, dtype, attn, config = (_none(k) for k in keys)
        out.append(Group(task=str(task), model=str(model), train_len=None if train_len is None else int(train_len),
                         dtype=str(dtype), attn=str(attn), config=config or "",
                         frame=part.drop(columns="_index").reset_index(drop=True),
                         records=[records[i] for i in part["_index"]]))
    return out
