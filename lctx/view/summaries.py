"""Summaries across cells: category averages (declared by LongBench's family) and effective lengths (RULER's
absolute threshold and NoLiMa's relative one, for every task whose headline is a success rate).

A family names its summary (:attr:`lctx.evals.TaskFamily.summary`); this module computes it from the same cells
the tables show, and renders it the way tables render (Markdown, rich, HTML), so ``lctx results`` and
``lctx report`` print the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lctx import evals
from lctx.evals import Metric
from lctx.spec import format_length
from lctx.view import frame as frames

DEFAULT_THRESHOLD = 85.6  # RULER: Llama-2-7B's average score at 4k, in percent
DEFAULT_RELATIVE = 0.85  # NoLiMa: the share of a model's own short-context score an effective length keeps


@dataclass
class Summary:
    """A small table of derived values: a title, column names and rows of texts (numbers kept in ``values``)."""

    kind: str  # categories | effective_length | correlation
    title: str
    columns: list[str]
    rows: list[list[str]]
    values: list[dict[str, Any]] = field(default_factory=list)  # one per row: the numbers behind the texts

    def markdown(self) -> str:
        from lctx.view.tables import md_escape

        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in self.rows]
        return f"### {self.title}\n\n" + "\n".join(lines)

    def to_rich(self):
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=escape(self.title), title_justify="left")
        for column in self.columns:
            table.add_column(column, overflow="fold")
        for row in self.rows:
            table.add_row(*map(escape, row))
        return table


def build(records: Iterable[dict[str, Any]], threshold: float | None = None,
          relative: float | None = None) -> list[Summary]:
    """The category averages the records' families declare, then the effective lengths of every task with a
    success-rate headline; ``threshold`` (percent) is RULER's bar, ``relative`` NoLiMa's ratio."""
    records = frames.revive(records)
    categories = [r for r in records if ":" in str(r.get("task", ""))
                  and frames.section(str(r["task"])) in evals.FAMILIES
                  and evals.family(frames.section(str(r["task"]))).summary == "categories"]
    return category_summaries(categories) + effective_length_summaries(records, threshold, relative)


# ---- category averages (LongBench) -------------------------------------------------------------------------


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 2) if present else None


def averages(scores: dict[str, float | None], categories: dict[str, str],
             order: tuple[str, ...]) -> tuple[dict[str, float | None], float | None]:
    """Category means of the tasks present, and their mean (LongBench's "Avg")."""
    present = [c for c in order if any(categories[t] == c for t in scores)]
    means = {c: _mean(v for t, v in scores.items() if categories[t] == c) for c in present}
    return means, _mean(means.values())


def category_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Category and overall averages of ok records, one row per (suite, model, variant, length, settings).

    Records are grouped by their suite (a member attr, e.g. LongBench / LongBench-E), model, variant, length,
    training length, dtype, attention and shared settings (the config without the members' own parameters, e.g.
    each task's answer budget); a row has the task scores, the mean of each category over its tasks present, and
    ``overall``, the mean of the categories. Members with length buckets (LongBench-E) also get ``buckets``.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    for record in records:
        kind = evals.task_type(str(record.get("task")))
        if kind is None or record.get("status") != "ok":
            continue
        attrs = dict(kind.attrs)
        if "category" not in attrs:
            continue
        member_keys = set(getattr(kind.cls, "member_params", ()))
        config = {k: v for k, v in (record.get("config") or {}).items() if k not in member_keys}
        key = (attrs.get("suite", frames.section(kind.name)), record.get("model"), record.get("rope"),
               record.get("length"), record.get("train_len"), record.get("dtype"), record.get("attn"),
               json.dumps(config, sort_keys=True, default=str))
        group = groups.setdefault(key, {"records": {}, "kinds": {}, "family": frames.section(kind.name)})
        member = kind.name.partition(":")[2]
        group["records"][member] = record
        group["kinds"][member] = kind
    rows = []
    for (suite, model, rope, length, train_len, dtype, attn, config), group in groups.items():
        family = evals.family(group["family"])
        categories = {name: dict(kind.attrs)["category"] for name, kind in group["kinds"].items()}
        scores = {name: r["metrics"].get("score") for name, r in group["records"].items()}
        means, overall = averages(scores, categories, family.categories)
        first = next(iter(group["records"].values()))
        row = {"suite": suite, "model": model, "rope": rope, "rope_input": first.get("rope_input") or rope,
               "length": length, "train_len": train_len, "dtype": dtype, "attn": attn, "config": json.loads(config),
               "tasks": scores, "categories": means, "overall": overall}
        buckets = sorted({k.removeprefix("score_") for r in group["records"].values() for k in r["metrics"]
                          if k.startswith("score_")})
        if buckets:
            row["buckets"] = {}
            for name in buckets:
                part = {t: r["metrics"].get(f"score_{name}") for t, r in group["records"].items()}
                cats, total = averages(part, categories, family.categories)
                row["buckets"][name] = {"categories": cats, "overall": total}
        rows.append(row)
    return rows


def category_summaries(records: Iterable[dict[str, Any]]) -> list[Summary]:
    """:func:`category_rows` as summaries: one per suite, model, settings and length; variants × categories."""
    rows = category_rows(records)
    out = []
    settings = dict.fromkeys((r["suite"], r["model"], r["length"], r["train_len"], r["dtype"], r["attn"],
                              json.dumps(r["config"], sort_keys=True)) for r in rows)
    for suite, model, length, train_len, dtype, attn, config in settings:
        part = [r for r in rows if (r["suite"], r["model"], r["length"], r["train_len"], r["dtype"], r["attn"],
                                    json.dumps(r["config"], sort_keys=True)) == (suite, model, length, train_len,
                                                                                dtype, attn, config)]
        order = [c for r in part for c in r["categories"]]
        columns = list(dict.fromkeys(order)) + ["overall"]
        buckets = sorted({b for r in part for b in r.get("buckets", {})})
        columns += [f"overall {name}" for name in buckets]

        def cell(row: dict[str, Any], column: str) -> str:
            if column.startswith("overall "):
                value = row.get("buckets", {}).get(column.removeprefix("overall "), {}).get("overall")
            else:
                value = row["overall"] if column == "overall" else row["categories"].get(column)
            return "–" if value is None else f"{value:.2f}"

        tasks = sorted({t for r in part for t in r["tasks"]})
        past = "*" if train_len and length > train_len else ""
        title = (f"{suite} by category (score ×100; overall = mean of categories) · {model} · length "
                 f"{format_length(length)}{past} · train_len {train_len} · {dtype}/{attn} · {len(tasks)} tasks: "
                 f"{', '.join(tasks)}")
        out.append(Summary("categories", title, ["variant", *columns],
                           [[r["rope_input"], *(cell(r, c) for c in columns)] for r in part], part))
    return out


# ---- effective length (RULER's absolute threshold, NoLiMa's relative one) --------------------------------------


def applies(metric: Metric) -> bool:
    """Whether a headline metric has an effective length: a success rate, higher is better and in percent
    (passkey, niah, the synthetic members, LongBench-v2's accuracy). LongBench v1's scores (F1, ROUGE, edit
    similarity ×100) are not success rates, so RULER's bar means nothing there; they have category averages."""
    return metric.higher_is_better is True and metric.percent


def longest(lengths: list[int], passes) -> int | None:
    """The longest length such that it and every shorter one pass; None when the shortest fails."""
    found = None
    for length in sorted(lengths):
        if not passes(length):
            break
        found = length
    return found


def effective_length(records: Iterable[dict[str, Any]], threshold: float | None = None,
                     relative: float | None = None) -> list[dict[str, Any]]:
    """The effective length of each (model, variant, task, settings) whose headline metric :func:`applies`.

    **Absolute (RULER):** the longest evaluated length L such that the score at L and at every shorter
    evaluated length is above ``threshold`` (percent; RULER's 85.6 is Llama-2-7B's average at 4k).
    **Relative (NoLiMa):** the longest L such that the score at L and at every shorter length is at least
    ``relative`` × the variant's own score at the shortest evaluated length (its base; NoLiMa uses 0.85);
    None when that base is 0 or missing. A cell that is not ok counts as failing; None means even the
    shortest length fails.

    **Intervals:** each rule applied to the cells' 95% interval bounds (Wilson from counts, bootstrap over the
    samples otherwise; :meth:`lctx.view.frame.Group.value`): the lower bounds give the pessimistic length, the
    upper bounds the optimistic one. The relative rule compares a length's bounds with the base's opposite
    bounds (interval arithmetic on the ratio). Cells without an interval count at their value.

    When a family declares this summary (RULER-style synthetic tasks) and a (model, variant) has two or more of
    its tasks, a row ``<family>:mean`` applies the rules to their mean score (and mean bounds) at the lengths
    every one of them has, as RULER does for its headline.
    """
    limit = DEFAULT_THRESHOLD if threshold is None else threshold
    ratio = DEFAULT_RELATIVE if relative is None else relative
    rows = []
    for group in frames.groups(records):
        metric = group.headline[0]
        if not applies(metric):
            continue
        for rope in group.ropes:
            cells: dict[int, tuple[float, float, float] | None] = {}
            for n in group.lengths:
                value = group.value(rope, n, metric)
                if value is None or not value.finite:
                    cells[n] = None
                else:
                    low = value.value if value.low is None else value.low
                    high = value.value if value.high is None else value.high
                    cells[n] = (value.value, low, high)
            rope_input = group.frame.loc[group.frame["rope"] == rope, "rope_input"].iloc[0]
            rows.append(_row(group.model, rope, rope_input, group.task, group.train_len, group.dtype, group.attn,
                             group.config, cells, limit, ratio))
    means: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        family = frames.section(row["task"])
        if family in evals.FAMILIES and evals.family(family).summary == "effective_length":
            key = (row["model"], row["rope"], row["train_len"], row["dtype"], row["attn"], family)
            means.setdefault(key, []).append(row)
    for (model, rope, train_len, dtype, attn, family), parts in means.items():
        if len({p["task"] for p in parts}) < 2:
            continue
        shared = set.intersection(*(set(p["cells"]) for p in parts))
        cells = {}
        for length in shared:
            values = [p["cells"][length] for p in parts]
            cells[length] = None if None in values else tuple(sum(v[k] for v in values) / len(values)
                                                               for k in range(3))
        rows.append(_row(model, rope, parts[0]["rope_input"], f"{family}:mean", train_len, dtype, attn,
                         {"tasks": sorted(p["task"] for p in parts)}, cells, limit, ratio))
    return rows


def _row(model, rope, rope_input, task, train_len, dtype, attn, config,
         cells: dict[int, tuple[float, float, float] | None], limit: float, ratio: float) -> dict[str, Any]:
    """One row: the cells (value, low, high) by length and both effective lengths with their intervals."""
    lengths = sorted(cells)

    def above(k: int):
        return lambda n: cells[n] is not None and 100 * cells[n][k] > limit

    base = cells[lengths[0]] if lengths else None
    if base is None or base[0] <= 0:
        relative = relative_low = relative_high = None
    else:
        def kept(k: int, against: int):  # a length's value (k) against ratio × the base's bound (against)
            return lambda n: n == lengths[0] or (cells[n] is not None and cells[n][k] >= ratio * base[against])

        relative, relative_low, relative_high = (longest(lengths, kept(0, 0)), longest(lengths, kept(1, 2)),
                                                 longest(lengths, kept(2, 1)))
    uncertain = any(c is not None and c[1] != c[2] for c in cells.values())
    return {"model": model, "rope": rope, "rope_input": rope_input, "task": task, "train_len": train_len,
            "dtype": dtype, "attn": attn, "config": config, "threshold": limit, "ratio": ratio,
            "cells": {n: cells[n] for n in lengths},
            "scores": {n: None if cells[n] is None else cells[n][0] for n in lengths},
            "effective_length": longest(lengths, above(0)),
            "effective_interval": (longest(lengths, above(1)), longest(lengths, above(2))) if uncertain else None,
            "base": None if base is None else base[0],
            "relative_length": relative,
            "relative_interval": (relative_low, relative_high) if uncertain and base is not None and base[0] > 0
            else None}


def length_text(length: int | None, interval: tuple[int | None, int | None] | None, shortest: int | None) -> str:
    """``2k [1k–4k]``: an effective length with its interval (``< 1k`` when even the shortest length fails)."""
    def one(n: int | None) -> str:
        return format_length(n) if n is not None else f"< {format_length(shortest)}" if shortest else "–"

    text = one(length)
    if interval is not None and interval[0] != interval[1]:
        text += f" [{one(interval[0])}–{one(interval[1])}]"
    return text


def effective_length_summaries(records: Iterable[dict[str, Any]], threshold: float | None = None,
                               relative: float | None = None) -> list[Summary]:
    """One summary per model: both effective lengths of each task × variant, with their intervals."""
    rows = effective_length(records, threshold, relative)
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        texts = []
        for row in mine:
            shortest = min(row["scores"]) if row["scores"] else None
            scores = "  ".join(f"{format_length(n)}: {'–' if s is None else f'{100 * s:.1f}'}"
                               for n, s in row["scores"].items())
            texts.append([row["task"], str(row["rope_input"]), f"{row['threshold']:g}",
                          length_text(row["effective_length"], row["effective_interval"], shortest),
                          f"{100 * row['ratio']:g}%",
                          length_text(row["relative_length"], row["relative_interval"], shortest), scores])
        out.append(Summary("effective_length", f"effective length · {model}: RULER's (the longest length whose "
                           "score, and every shorter one's, is above the threshold) and NoLiMa's relative one (… is at "
                           "least the ratio × the variant's score at its shortest length); [95%]: the rule on the "
                           "cells' interval bounds",
                           ["task", "variant", "threshold", "effective length", "relative", "relative effective "
                            "length", "scores by length"], texts, mine))
    return out
