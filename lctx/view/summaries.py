"""Summaries across cells, declared by task families: category averages (LongBench) and effective length (RULER).

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
from lctx.spec import format_length
from lctx.view import frame as frames

DEFAULT_THRESHOLD = 85.6  # RULER: Llama-2-7B's average score at 4k, in percent


@dataclass
class Summary:
    """A small table of derived values: a title, column names and rows of texts (numbers kept in ``values``)."""

    kind: str  # categories | effective_length
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


def build(records: Iterable[dict[str, Any]], threshold: float | None = None) -> list[Summary]:
    """Every summary the records' families declare; ``threshold`` (percent) is RULER's effective-length bar."""
    records = frames.revive(records)
    kinds: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        prefix = frames.section(str(record.get("task", "")))
        if prefix in evals.FAMILIES and ":" in str(record.get("task", "")):
            summary = evals.family(prefix).summary
            if summary:
                kinds.setdefault(summary, []).append(record)
    out: list[Summary] = []
    if "categories" in kinds:
        out += category_summaries(kinds["categories"])
    if "effective_length" in kinds:
        out += effective_length_summaries(kinds["effective_length"], threshold)
    return out


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


# ---- effective length (RULER) -----------------------------------------------------------------------------


def effective_length(records: Iterable[dict[str, Any]], threshold: float | None = None) -> list[dict[str, Any]]:
    """RULER's effective length of each (model, variant, task, settings) in the records.

    The effective length is the longest evaluated length L such that the headline score at L **and at every
    shorter evaluated length** is above the threshold (percent; RULER's 85.6 is Llama-2-7B's average at 4k).
    A length whose cell is not ok counts as below; None means even the shortest is below. When a (model,
    variant) has two or more tasks, a row ``<family>:mean`` applies the rule to their mean score at the lengths
    every one of them has, as RULER does for its headline.
    """
    limit = DEFAULT_THRESHOLD if threshold is None else threshold
    rows = []
    for group in frames.groups(records):
        metric = group.headline[0]
        for rope in group.ropes:
            scores = {}
            for n in group.lengths:
                value = group.value(rope, n, metric)
                scores[n] = value.value if value is not None and value.finite else None
            rope_input = group.frame.loc[group.frame["rope"] == rope, "rope_input"].iloc[0]
            rows.append(_row(group.model, rope, rope_input, group.task, group.train_len, group.dtype, group.attn,
                             group.config, scores, limit))
    means: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["model"], row["rope"], row["train_len"], row["dtype"], row["attn"], frames.section(row["task"]))
        means.setdefault(key, []).append(row)
    for (model, rope, train_len, dtype, attn, family), parts in means.items():
        if len({p["task"] for p in parts}) < 2:
            continue
        shared = set.intersection(*(set(p["scores"]) for p in parts))
        scores = {}
        for length in shared:
            values = [p["scores"][length] for p in parts]
            scores[length] = None if None in values else sum(values) / len(values)
        rows.append(_row(model, rope, parts[0]["rope_input"], f"{family}:mean", train_len, dtype, attn,
                         {"tasks": sorted(p["task"] for p in parts)}, scores, limit))
    return rows


def _row(model, rope, rope_input, task, train_len, dtype, attn, config, scores: dict[int, float | None],
         limit: float) -> dict[str, Any]:
    effective = None
    for length in sorted(scores):
        score = scores[length]
        if score is None or not 100 * score > limit:
            break
        effective = length
    return {"model": model, "rope": rope, "rope_input": rope_input, "task": task, "train_len": train_len,
            "dtype": dtype, "attn": attn, "config": config, "threshold": limit,
            "scores": dict(sorted(scores.items())), "effective_length": effective}


def effective_length_summaries(records: Iterable[dict[str, Any]], threshold: float | None = None) -> list[Summary]:
    """One summary per model: the effective length of each task × variant."""
    rows = effective_length(records, threshold)
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        texts = []
        for row in mine:
            shortest = format_length(min(row["scores"])) if row["scores"] else "?"
            effective = (format_length(row["effective_length"]) if row["effective_length"] is not None
                         else f"< {shortest}")
            scores = "  ".join(f"{format_length(n)}: {'–' if s is None else f'{100 * s:.1f}'}"
                               for n, s in row["scores"].items())
            texts.append([row["task"], str(row["rope_input"]), f"{row['threshold']:g}", effective, scores])
        out.append(Summary("effective_length", f"effective length (RULER: longest length whose score, and every "
                           f"shorter one's, is above the threshold) · {model}",
                           ["task", "variant", "threshold", "effective length", "scores by length"], texts, mine))
    return out
