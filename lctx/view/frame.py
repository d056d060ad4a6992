"""The view's reading of records: groups of comparable cells, their values, metrics and variant labels.

Every table, summary, figure and the regression gate read cells through this module, so ``lctx results``,
``table.md``, ``lctx report`` and the gate can never disagree about which metric a task is judged by, which way is
better (as the task declares it: :class:`lctx.evals.Metric`), or how the depths of a retrieval cell are pooled.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from lctx import evals, patches
from lctx.evals import Metric
from lctx.stats import bootstrap_ratio, wilson

# a table (and a figure) covers records sharing these fields
GROUP_FIELDS = ("task", "task_spec", "model", "model_fingerprint", "train_len", "dtype", "attn")
FIXED = {"model", "model_fingerprint", "rope", "task", "task_spec", "length", "depth", "train_len", "dtype", "attn",
         "rope_input", "config", "status", "seconds"}


def revive(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in today's form (:func:`lctx.evals.upgrade`) with non-finite metrics as floats again (the store
    writes inf/NaN as the strings "inf"/"nan")."""

    def number(value: Any) -> Any:
        if isinstance(value, str) and value.lower() in ("inf", "-inf", "nan", "infinity", "-infinity"):
            return float(value)
        if isinstance(value, list):
            return [number(v) for v in value]
        return value

    return [{**r, "metrics": {k: number(v) for k, v in (r.get("metrics") or {}).items()}}
            for r in map(evals.upgrade, records)]


def config_label(config: dict[str, Any] | None) -> str:
    """A task's identity parameters as ``key=value`` words (table titles, CSV)."""
    return " ".join(f"{k}={v}" for k, v in (config or {}).items() if v is not None)


def frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per record with the key fields, status, seconds and every scalar metric as a column."""
    rows = []
    for r in records:
        row = {f: r.get(f) for f in ("model", "model_fingerprint", "rope", "task", "task_spec", "length", "depth",
                                     "train_len", "dtype", "attn")}
        row["rope_input"] = r.get("rope_input") or r.get("rope")
        row["config"] = config_label(r.get("config"))
        row["status"] = r.get("status")
        row["seconds"] = r.get("seconds")
        for name, value in (r.get("metrics") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                row[name] = value
        rows.append(row)
    return pd.DataFrame(rows)


def variant_labels(records: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Canonical rope -> label: the spec as typed, unless one typed spec resolved to several canonical forms."""
    typed: dict[str, str] = {}
    for record in records:
        typed.setdefault(record["rope"], record.get("rope_input") or record["rope"])
    count = Counter(typed.values())
    return {rope: label if count[label] == 1 else rope for rope, label in typed.items()}


def variant_family(rope: str) -> tuple[patches.Family | None, int, bool]:
    """A canonical spec's family, the variant's place among the family's members, and whether log-n is on.

    Read through the spec grammar; a variant this lctx does not know (old records) has no family."""
    try:
        spec = patches.parse(rope)
    except patches.SpecError:
        return None, 0, False
    family = spec.family
    return family, patches.family_members(family.name).index(spec.name), bool(spec.kwargs.get("logn"))


def section(task: str) -> str:
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


def pool(part: pd.DataFrame, metric: Metric) -> Value:
    """The value of a (variant, length) cell from its records (one per depth for retrieval tasks).

    Any error makes the cell an error, else any OOM an OOM. A metric with counts pools the trials of every
    depth (Wilson interval recomputed); other metrics are averaged over depths. A non-finite value of a
    metric that should be finite (a diverged loss) shows as an error too.
    """
    statuses = set(part["status"])
    if statuses - {"ok", "oom"}:
        return Value(None, "error")
    if "oom" in statuses:
        return Value(None, "oom")
    name = metric.name
    if metric.counts and set(metric.counts) <= set(part.columns):
        successes, trials = metric.counts
        if part[[successes, trials]].notna().all(axis=None) and part[trials].sum() > 0:
            correct, total = int(part[successes].sum()), int(part[trials].sum())
            low, high = wilson(correct, total)
            return Value(correct / total, "ok", low, high)
    if name not in part or part[name].isna().all():
        return Value(None, "ok")
    value = float(part[name].dropna().astype(float).mean())
    if metric.interval and len(part) == 1 and set(metric.interval) <= set(part.columns):
        low, high = (part[k].iloc[0] for k in metric.interval)
        if pd.notna(low) and pd.notna(high):  # one record that brings its own interval
            return Value(value, "ok", float(low), float(high))
    return Value(value, "ok")


def resampled_interval(records: Iterable[dict[str, Any]], metric: Metric) -> tuple[float, float] | None:
    """The 95% bootstrap interval of ``metric`` over the per-sample values of ``records`` (every depth of a cell
    pooled), as the metric declares its recomputation (:class:`lctx.evals.Resample`); None when the metric
    declares none or a sample lacks the values (records of other versions, hand-written records)."""
    how = metric.resample
    if how is None:
        return None
    values: list[float] = []
    weights: list[float] = []
    for record in records:
        for sample in record.get("samples") or []:
            value = sample.get(how.value) if isinstance(sample, dict) else None
            weight = sample.get(how.weight) if isinstance(sample, dict) and how.weight else 1
            if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in (value, weight)):
                return None
            values.append(float(value))
            weights.append(float(weight))
    return bootstrap_ratio(values, weights, scale=how.scale, exp=how.exp)


@dataclass
class Group:
    """Records of one task spec for one model under one configuration: what a table or a figure panel covers."""

    task: str
    task_spec: str
    model: str
    train_len: int | None
    dtype: str
    attn: str
    config: dict[str, Any]
    frame: pd.DataFrame  # frame() rows
    records: list[dict[str, Any]]  # the same records, for list-valued metrics (per-position losses) and samples
    cache: dict[tuple, Value | None] = field(default_factory=dict, repr=False)  # value() by its arguments

    @property
    def settings(self) -> str:
        label = config_label(self.config)
        return f"{self.dtype}/{self.attn}" + (f" · {label}" if label else "")

    @property
    def kind(self) -> evals.TaskType | None:
        return evals.task_type(self.task)

    @property
    def metrics(self) -> list[Metric]:
        """The metrics the task declares for these records (in declared order), or for a task lctx does not
        know, one per scalar metric recorded, with no direction (never bolded, never gated)."""
        declared: dict[str, Metric] = {}
        for record in self.records:
            for metric in evals.metrics_of(record):
                declared.setdefault(metric.name, metric)
        if declared or self.kind is not None:
            return list(declared.values())
        return [Metric(c, None) for c in self.frame.columns if c not in FIXED and self.frame[c].notna().any()]

    @property
    def headline(self) -> list[Metric]:
        """The metrics a table shows by default: the headline ones the records have, else the first headline one
        (every cell failed: the table shows their statuses), else the first metric."""
        metrics = self.metrics
        present = {c for c in self.frame.columns if self.frame[c].notna().any()}
        declared = [m for m in metrics if m.headline]
        chosen = [m for m in declared if m.name in present] or declared[:1] or metrics[:1]
        return chosen or [Metric("value", None)]

    def metric(self, name: str) -> Metric:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        return Metric(name, None)

    @property
    def ropes(self) -> list[str]:
        return list(dict.fromkeys(self.frame["rope"]))

    @property
    def lengths(self) -> list[int]:
        return sorted({int(n) for n in self.frame["length"]})

    @property
    def depths(self) -> list[float]:
        return sorted({float(d) for d in self.frame["depth"].dropna()})

    @property
    def has_depths(self) -> bool:
        return bool(self.frame["depth"].notna().any())

    def value(self, rope: str, length: int, metric: Metric, depth: float | None = None) -> Value | None:
        """The cell's value, pooled over depths unless one is given; None when no record covers it. A value
        without a Wilson or recorded interval gets the bootstrap one over its samples when the metric declares
        how (:func:`resampled_interval`)."""
        key = (rope, length, metric, depth)
        if key not in self.cache:
            rows = self.frame[(self.frame["rope"] == rope) & (self.frame["length"] == length)]
            if depth is not None:
                rows = rows[rows["depth"] == depth]
            value = pool(rows, metric) if len(rows) else None
            if value is not None and value.finite and value.low is None:
                interval = resampled_interval([self.records[i] for i in rows.index], metric)
                if interval is not None:
                    value = Value(value.value, value.status, *interval)
            self.cache[key] = value
        return self.cache[key]


def _none(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def groups(records: Iterable[dict[str, Any]]) -> list[Group]:
    """Records split by (task spec, model, training length, dtype, attention), in record order."""
    records = revive(records)
    if not records:
        return []
    df = frame(records)
    df["_index"] = range(len(df))
    prints = df.groupby("model", dropna=False)["model_fingerprint"].nunique(dropna=True).to_dict()
    out = []
    for keys, part in df.groupby(list(GROUP_FIELDS), sort=False, dropna=False):
        task, task_spec, model, fingerprint, train_len, dtype, attn = (_none(k) for k in keys)
        members = [records[i] for i in part["_index"]]
        if prints.get(model, 0) > 1:  # two versions of one local model's files: say which one a table shows
            model = f"{model} @{fingerprint or 'unknown files'}"
        out.append(Group(task=str(task), task_spec=str(task_spec), model=str(model),
                         train_len=None if train_len is None else int(train_len), dtype=str(dtype), attn=str(attn),
                         config=members[0].get("config") or {},
                         frame=part.drop(columns="_index").reset_index(drop=True), records=members))
    return out
