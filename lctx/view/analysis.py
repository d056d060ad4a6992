"""Does perplexity predict task scores here? Spearman's rank correlation between a model's perplexity and each
task's score across variants × lengths, with a bootstrap interval, and the scatter behind it.

The long-context literature disagrees: the LCEG study (Lu et al., 2024) finds perplexity tracks long-context
task scores across extension methods, HELMET (Yen et al., 2024) that it does not reliably. lctx lets a user
look on their own model: when a results directory holds ``ppl`` records and records of a task whose headline
metric is higher-is-better (passkey, niah, synthetic, LongBench, lm-eval scores) for the same model and
settings (training length, dtype, attention), every (variant, length) cell both have, with a finite value in
each, is a point (perplexity, score). With at least :data:`MIN_POINTS` points the panel reports ρ (negative:
lower perplexity goes with higher scores) and its 95% percentile bootstrap interval over the points
(:func:`lctx.stats.bootstrap_pairs`, seeded). Points share variants and lengths, so they are not independent;
read the interval as the spread of this grid, not of the population of all models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lctx import stats
from lctx.evals import Metric
from lctx.spec import format_length
from lctx.view import frame as frames
from lctx.view import plotting as plots
from lctx.view.frame import Group
from lctx.view.summaries import Summary
from lctx.view.tables import model_stem, slugify

MIN_POINTS = 4  # below this a rank correlation says next to nothing (3 points: 6 orderings)
PPL_TASK = "ppl"


@dataclass
class Correlation:
    """ρ between one perplexity metric and one task's headline score over the (variant, length) cells both have."""

    model: str
    settings: str  # training length, dtype/attention
    ppl: Group
    task: Group
    metric: Metric  # the task's headline metric
    points: list[tuple[str, int, float, float]]  # (canonical rope, length, perplexity, score)
    rho: float
    interval: tuple[float, float] | None

    @property
    def reading(self) -> str:
        """What the interval says, in words."""
        if math.isnan(self.rho):
            return "undefined (a constant side)"
        if self.interval is None:
            return "no interval"
        low, high = self.interval
        if high < 0:
            return "lower perplexity goes with higher scores"
        if low > 0:
            return "lower perplexity goes with lower scores"
        return "no clear relation (the interval holds 0)"


def _settings(group: Group) -> tuple:
    return group.model, group.train_len, group.dtype, group.attn


def correlations(records: Iterable[dict[str, Any]]) -> list[Correlation]:
    """Every (perplexity group, task group) pair of the same model and settings with enough shared cells."""
    groups = frames.groups(records)
    out = []
    for ppl in (g for g in groups if g.task == PPL_TASK):
        ppl_metric = ppl.headline[0]
        for task in groups:
            metric = task.headline[0]
            if task.task == PPL_TASK or metric.higher_is_better is not True or _settings(task) != _settings(ppl):
                continue
            points = []
            for rope in (r for r in ppl.ropes if r in task.ropes):
                for n in (n for n in ppl.lengths if n in task.lengths):
                    x, y = ppl.value(rope, n, ppl_metric), task.value(rope, n, metric)
                    if x is not None and y is not None and x.finite and y.finite:
                        points.append((rope, n, float(x.value), float(y.value)))
            if len(points) < MIN_POINTS:
                continue
            xs, ys = [p[2] for p in points], [p[3] for p in points]
            out.append(Correlation(ppl.model, f"train_len {ppl.train_len} · {ppl.dtype}/{ppl.attn}", ppl, task,
                                   metric, points, stats.spearman(xs, ys), stats.bootstrap_pairs(xs, ys)))
    return out


def _number(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:+.2f}"


def correlation_summaries(records: Iterable[dict[str, Any]],
                          found: list[Correlation] | None = None) -> list[Summary]:
    """One summary per model: ρ(perplexity, score) of each task, its interval and what it says."""
    found = correlations(records) if found is None else found
    out = []
    for model in dict.fromkeys(c.model for c in found):
        mine = [c for c in found if c.model == model]
        rows = [[c.task.task, c.ppl.headline[0].name, str(len(c.points)), _number(c.rho),
                 "–" if c.interval is None else f"[{c.interval[0]:+.2f}, {c.interval[1]:+.2f}]", c.reading]
                for c in mine]
        values = [{"model": c.model, "task": c.task.task, "points": len(c.points), "rho": c.rho,
                   "interval": c.interval, "settings": c.settings} for c in mine]
        out.append(Summary("correlation", f"does perplexity predict task scores? Spearman's ρ between perplexity "
                           f"and each task's score across variants × lengths, 95% bootstrap interval · {model}",
                           ["task", "perplexity", "points", "Spearman ρ", "95% interval", "reading"], rows, values))
    return out


def scatter(found: list[Correlation], styles: dict[str, plots.Style], labels: dict[str, str]) -> Figure:
    """One panel per task: perplexity (log x) against the task's score, a point per (variant, length) in the
    variant's style, larger for longer contexts; ρ and its interval in the panel title."""
    rows, cols = math.ceil(len(found) / 3), min(len(found), 3)
    fig = Figure(figsize=(plots.COLUMN_WIDTH if cols == 1 else plots.PAGE_WIDTH, 0.8 + 2.1 * rows),
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    lengths = sorted({p[1] for c in found for p in c.points})
    size = {n: 9 + 40 * k / max(1, len(lengths) - 1) for k, n in enumerate(lengths)}
    ropes: list[str] = []
    for idx, ax in enumerate(axes.flat):
        if idx >= len(found):
            ax.set_visible(False)
            continue
        c = found[idx]
        for rope, n, x, y in c.points:
            ropes.append(rope)
            style = styles[labels[rope]]
            ax.scatter([x], [y], s=size[n], color=style.color, marker=style.marker, edgecolors="white",
                       linewidths=0.4, zorder=3)
        xs = [p[2] for p in c.points]
        if min(xs) > 0 and max(xs) > 3 * min(xs):
            plots.log_axis(ax, xs, "x")  # perplexities that blew up past the training length
        else:
            ax.ticklabel_format(axis="x", useOffset=False)
        if c.metric.percent:
            ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
        interval = "" if c.interval is None else f" [{c.interval[0]:+.2f}, {c.interval[1]:+.2f}]"
        ax.set_title(f"{c.task.task}\nρ = {_number(c.rho)}{interval}, n = {len(c.points)}")
        ax.set_xlabel(f"{c.ppl.headline[0].name} (lower is better)")
        if idx % cols == 0:
            ax.set_ylabel(f"{c.metric.name} (higher is better)")
    handles = plots.variant_handles([labels[r] for r in dict.fromkeys(ropes)], styles)
    for handle in handles:
        handle.set_linestyle("none")
    handles += [Line2D([], [], marker="o", color="0.45", linestyle="none", markersize=math.sqrt(size[n]),
                       label=f"length {format_length(n)}") for n in (lengths[0], lengths[-1])][:len(set(lengths))]
    plots.legend(fig, handles)
    return fig


def figures(records: list[dict[str, Any]], found: list[Correlation] | None = None) -> Iterator[plots.Plot]:
    """One scatter figure per model and settings."""
    records = frames.revive(records)
    found = correlations(records) if found is None else found
    labels = frames.variant_labels(records)
    styles = plots.variant_styles(labels)
    by_model: dict[tuple[str, str], list[Correlation]] = {}
    for c in found:
        by_model.setdefault((c.model, c.settings), []).append(c)
    for (model, settings), mine in by_model.items():
        rhos = ", ".join(f"{c.task.task} {_number(c.rho)}" for c in mine)
        yield plots.Plot(f"correlation-{slugify(model_stem(model))}", "correlation", model,
                         f"perplexity against task scores · {model}",
                         f"Each task's headline score against perplexity ({mine[0].ppl.headline[0].name}), one point "
                         f"per variant × length (larger: longer context), variants in their report colours; "
                         f"Spearman's ρ with its 95% bootstrap interval over the points ({rhos}). {model}, {settings}.",
                         scatter(mine, styles, labels))

