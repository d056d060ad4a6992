"""Figures: each task declares its kinds (:data:`lctx.evals.FIGURES`: a metric-by-length line plot, the loss by
position, length × depth heatmaps) and each family its side-by-side view (LongBench by category, synthetic tasks
by length); this module draws them, in the styles of :mod:`lctx.view.plotting`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.transforms import blended_transform_factory

from lctx import evals
from lctx.evals import Metric
from lctx.spec import format_length
from lctx.view import frame as frames
from lctx.view.frame import Group
from lctx.view.plotting import (
    COLUMN_WIDTH,
    PAGE_WIDTH,
    RETRIEVAL_CMAP,
    STYLE,
    Plot,
    Style,
    axis_label,
    legend,
    length_axis,
    log_axis,
    metric_label,
    panel_grid,
    tokens,
    train_line,
    variant_handles,
    variant_styles,
    wrap,
)
from lctx.view.tables import model_stem, slugify

FORMATS = ("png", "pdf", "svg")


# ---- the figures -------------------------------------------------------------------------------------------


def metric_by_length(group: Group, metrics: list[Metric], labels: dict[str, str], styles: dict[str, Style],
                     titles: list[str] | None = None) -> Figure | None:
    """One panel per metric: a line per variant over length; failed cells marked at the top of the panel."""
    lengths = group.lengths
    fig = Figure(figsize=(COLUMN_WIDTH if len(metrics) == 1 else PAGE_WIDTH, 2.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    handles = variant_handles([labels[r] for r in group.ropes], styles)
    marks: set[str] = set()
    drawn = False
    for ax, metric, title in zip(axes, metrics, titles or [m.name for m in metrics], strict=True):
        log = metric.higher_is_better is False
        finite_values: list[float] = []
        top = blended_transform_factory(ax.transData, ax.transAxes)
        for k, rope in enumerate(group.ropes):
            style = styles[labels[rope]]
            values = [group.value(rope, n, metric) for n in lengths]
            xs = [n for n, v in zip(lengths, values, strict=True) if v is not None and v.finite]
            ys = [v.value for v in values if v is not None and v.finite]
            finite_values += ys
            ax.plot(xs, ys, color=style.color, marker=style.marker, linestyle=style.linestyle, zorder=3)
            for n, v in zip(lengths, values, strict=True):  # stagger markers so that variants stay visible
                y = 1.0 - 0.035 * (k % 4)
                if v is not None and v.status == "oom":
                    ax.plot([n], [y], marker="x", color=style.color, transform=top, clip_on=False,
                            markersize=5, markeredgewidth=1.2, linestyle="none", zorder=4)
                    marks.add("oom")
                elif v is not None and v.status == "ok" and v.value is not None and math.isinf(v.value):
                    ax.plot([n], [y], marker="^", color=style.color, transform=top, clip_on=False,
                            linestyle="none", zorder=4)
                    marks.add("inf")
        drawn = drawn or bool(finite_values)
        if log and finite_values and min(finite_values) > 0:
            log_axis(ax, finite_values)
        elif metric.percent:
            ax.set_ylim(-0.04, 1.04)
            ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
        length_axis(ax, lengths, group.train_len)
        ax.set_title(title)
        ax.set_ylabel(axis_label(metric))
    if not drawn and not marks:
        return None
    if "oom" in marks:
        handles.append(Line2D([], [], marker="x", color="0.2", linestyle="none", markeredgewidth=1.2,
                              label="out of memory"))
    if "inf" in marks:
        handles.append(Line2D([], [], marker="^", color="0.2", linestyle="none", label="infinite"))
    legend(fig, handles)
    return fig


def retrieval_heatmaps(group: Group, metric: Metric, labels: dict[str, str], styles: dict[str, Style]) -> Figure:
    """Length × depth heatmaps, one panel per variant, one shared colour scale from 0 to 100%."""
    ropes, lengths = group.ropes, group.lengths
    depths = group.depths
    rows, cols = panel_grid(len(ropes), 3)
    width = min(PAGE_WIDTH, 0.45 + cols * max(1.7, 0.36 * len(lengths) + 0.6))
    fig = Figure(figsize=(width, 0.55 + rows * max(1.3, 0.18 * len(depths) + 0.75)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    norm = mcolors.Normalize(0, 1)
    cmap = matplotlib.colormaps[RETRIEVAL_CMAP]
    image = None
    annotate = len(lengths) * len(depths) <= 96
    boundary = sum(1 for n in lengths if group.train_len and n <= group.train_len)
    for idx, ax in enumerate(axes.flat):
        if idx >= len(ropes):
            ax.set_visible(False)
            continue
        rope = ropes[idx]
        grid = np.full((len(depths), len(lengths)), np.nan)
        failed: list[tuple[int, int, str]] = []
        for i, depth in enumerate(depths):
            for j, n in enumerate(lengths):
                v = group.value(rope, n, metric, depth)
                if v is None:
                    continue
                if v.finite:
                    grid[i, j] = v.value
                elif v.status != "ok":
                    failed.append((i, j, "OOM" if v.status == "oom" else "ERR"))
        ax.set_facecolor("0.92")
        image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        for i, j, text in failed:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85",
                                                      edgecolor="0.6", hatch="////", linewidth=0))
            ax.text(j, i, text, ha="center", va="center", fontsize=5.5, color="0.15")
        if annotate:
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    if not np.isnan(grid[i, j]):
                        ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=5.5,
                                color="black" if grid[i, j] > 0.6 else "white")
        if 0 < boundary < len(lengths):  # a white gap between lengths within and past training
            ax.axvline(boundary - 0.5, color="white", linewidth=2.5)
        ax.grid(False)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.tick_params(length=0)
        ax.set_title(wrap(labels[rope], int(10 * (width - 0.9) / cols)), color=styles[labels[rope]].color,
                     fontweight="bold")
        ax.set_xticks(range(len(lengths)), [format_length(n) + ("*" if boundary and j >= boundary else "")
                                            for j, n in enumerate(lengths)])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        if idx % cols == 0:
            ax.set_ylabel("needle depth")
        if idx // cols == rows - 1 or idx + cols >= len(ropes):
            ax.set_xlabel("context length")
            ax.xaxis.set_tick_params(labelbottom=True)
    bar = fig.colorbar(image, ax=axes, shrink=0.9, aspect=25, pad=0.02)
    bar.ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
    bar.set_label(metric.name)
    bar.outline.set_visible(False)
    return fig


def position_loss(group: Group, labels: dict[str, str], styles: dict[str, Style]) -> Figure | None:
    """Mean NLL by position bucket, one panel per length: where in the window a variant starts to fail."""
    curves: dict[int, dict[str, tuple[list[float], list[float]]]] = {}
    for record in group.records:
        metrics = record.get("metrics") or {}
        nll, edges = metrics.get("bucket_nll"), metrics.get("bucket_edges")
        if record.get("status") != "ok" or not nll or not edges or len(edges) != len(nll) + 1:
            continue
        points = [((a + b) / 2, y) for a, b, y in zip(edges[:-1], edges[1:], nll, strict=True)
                  if y is not None and math.isfinite(y)]
        if points:
            xs, ys = zip(*points, strict=True)
            curves.setdefault(int(record["length"]), {})[record["rope"]] = (list(xs), list(ys))
    if not curves:
        return None
    lengths = sorted(curves)
    rows, cols = panel_grid(len(lengths), 3)
    fig = Figure(figsize=(COLUMN_WIDTH if cols == 1 else PAGE_WIDTH, 0.6 + 1.9 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for idx, ax in enumerate(axes.flat):
        if idx >= len(lengths):
            ax.set_visible(False)
            continue
        length = lengths[idx]
        for rope in group.ropes:
            if rope in curves[length]:
                style = styles[labels[rope]]
                xs, ys = curves[length][rope]
                ax.plot(xs, ys, color=style.color, marker=style.marker, linestyle=style.linestyle,
                        markersize=2.5)
        ax.set_xlim(0, length)
        ax.xaxis.set_major_locator(ticker.FixedLocator([length * q / 4 for q in range(5)]))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(tokens))
        if group.train_len and group.train_len < length:
            train_line(ax, group.train_len)
        ax.set_title(f"length {format_length(length)}")
        ax.set_xlabel("position (tokens)")
        if idx % cols == 0:
            ax.set_ylabel("mean NLL (nats)")
    legend(fig, variant_handles([labels[r] for r in group.ropes], styles))
    return fig


def by_category(groups: list[Group], labels: dict[str, str], styles: dict[str, Style],
                order: tuple[str, ...]) -> Figure | None:
    """Grouped bars: each category's mean task score (categories as the members declare them, in the family's
    ``order``) and their mean ("overall", as LongBench averages), one panel per length."""
    scores: dict[tuple[int, str, str], list[float]] = {}  # (length, category, rope) -> task scores
    ropes: list[str] = []
    for group in groups:
        metric = group.headline[0]
        category = str(dict(group.kind.attrs).get("category", "other")) if group.kind else "other"
        for rope in group.ropes:
            ropes.append(rope)
            for n in group.lengths:
                v = group.value(rope, n, metric)
                if v is not None and v.finite:
                    scores.setdefault((n, category, rope), []).append(v.value)
    if not scores:
        return None
    means = {key: float(np.mean(values)) for key, values in scores.items()}
    ropes = list(dict.fromkeys(ropes))
    lengths = sorted({n for n, _, _ in scores})
    present = {c for _, c, _ in scores}
    categories = [c for c in order if c in present] + sorted(present - set(order))
    for n in lengths:
        for rope in ropes:
            found = [means[(n, c, rope)] for c in categories if (n, c, rope) in means]
            if found:
                means[(n, "overall", rope)] = float(np.mean(found))
    columns = [*categories, "overall"]
    fig = Figure(figsize=(PAGE_WIDTH, 0.6 + 1.55 * len(lengths)), layout="constrained")
    axes = fig.subplots(len(lengths), 1, squeeze=False, sharey=True)[:, 0]
    width = 0.8 / len(ropes)
    train = groups[0].train_len
    for ax, n in zip(axes, lengths, strict=True):
        for k, rope in enumerate(ropes):
            style = styles[labels[rope]]
            xs = [c + (k - (len(ropes) - 1) / 2) * width for c in range(len(columns))]
            ys = [means.get((n, column, rope), np.nan) for column in columns]
            ax.bar(xs, ys, width=width * 0.92, color=style.color, edgecolor="white", linewidth=0.3,
                   hatch="///" if style.linestyle == "--" else None)
        ax.axvline(len(columns) - 1.5, color="0.6", linewidth=0.6)  # the overall mean is not a category
        ax.set_xticks(range(len(columns)), columns)
        ax.grid(axis="x", visible=False)
        past = "*, past the training length" if train and n > train else ""
        ax.set_title(f"context length {format_length(n)}{past}")
        ax.set_ylabel("score")
    legend(fig, [Patch(facecolor=styles[labels[r]].color, hatch="///" if styles[labels[r]].linestyle == "--"
                        else None, label=labels[r]) for r in ropes])
    return fig


def tasks_by_length(groups: list[Group], labels: dict[str, str], styles: dict[str, Style]) -> Figure | None:
    """One panel per task (e.g. each synthetic task): its headline metric over length."""
    rows, cols = panel_grid(len(groups), 3)
    fig = Figure(figsize=(COLUMN_WIDTH if cols == 1 else PAGE_WIDTH, 0.7 + 1.9 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    ropes: list[str] = []
    drawn = False
    for idx, ax in enumerate(axes.flat):
        if idx >= len(groups):
            ax.set_visible(False)
            continue
        group = groups[idx]
        metric = group.headline[0]
        for rope in group.ropes:
            ropes.append(rope)
            style = styles[labels[rope]]
            values = [(n, group.value(rope, n, metric)) for n in group.lengths]
            points = [(n, v.value) for n, v in values if v is not None and v.finite]
            drawn = drawn or bool(points)
            ax.plot([n for n, _ in points], [y for _, y in points], color=style.color, marker=style.marker,
                    linestyle=style.linestyle)
        if metric.percent:
            ax.set_ylim(-0.04, 1.04)
            ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
        length_axis(ax, group.lengths, group.train_len)
        ax.set_title(group.task.split(":", 1)[-1])
        if idx % cols == 0:
            ax.set_ylabel(metric.name)
    if not drawn:
        return None
    legend(fig, variant_handles([labels[r] for r in dict.fromkeys(ropes)], styles))
    return fig


# ---- all figures of a report -------------------------------------------------------------------------------


def _context(group: Group) -> str:
    train = format_length(group.train_len) if group.train_len else "unknown"
    return f"{group.model}, training length {train} (dotted line), {group.settings}"


def figures(records: list[dict[str, Any]]) -> Iterator[Plot]:
    """Every figure the records support, one at a time (each is saved and closed before the next is drawn): the
    kinds each task declares, then each family's side-by-side view of its members."""
    records = frames.revive(records)
    labels = frames.variant_labels(records)
    styles = variant_styles(labels)
    families: dict[tuple, list[Group]] = {}  # members of one family, model and settings together
    for group in frames.groups(records):
        section = frames.section(group.task)
        kind = group.kind
        if section in evals.FAMILIES and ":" in group.task and evals.family(section).figure:
            families.setdefault((section, group.model, group.train_len, group.dtype, group.attn), []).append(group)
            continue
        declared = kind.cls.figures if kind is not None else ("lines",)
        metrics = group.headline
        stem = f"{slugify(group.task)}-{slugify(model_stem(group.model))}"
        if "heatmap" in declared and group.has_depths:
            yield Plot(f"heatmap-{stem}", section, group.model, f"{group.task}: {metrics[0].name} by length and depth",
                       f"{group.task} {metrics[0].name} by context length (x; * past the training length, after the "
                       f"white gap) and needle depth (y), one panel per variant. {_context(group)}.",
                       retrieval_heatmaps(group, metrics[0], labels, styles))
        if "lines" in declared:
            titles = [metric_label(m, group) if len(metrics) > 1 or m.label else group.task for m in metrics]
            figure = metric_by_length(group, metrics, labels, styles, titles)
            names = [m.name for m in metrics]
            if figure is not None:
                yield Plot(f"{'ppl' if section == 'ppl' else 'metric'}-{stem}", section, group.model,
                           f"{group.task}: {', '.join(names)} by length",
                           f"{group.task}: {' and '.join(names)} by context length, one line per variant; "
                           f"✕ out of memory. {_context(group)}.", figure)
        if "position_loss" in declared:
            figure = position_loss(group, labels, styles)
            if figure is not None:
                yield Plot(f"position-loss-{stem}", section, group.model, f"{group.task}: loss by position",
                           f"Mean per-token NLL by position in the window (8 buckets), one panel per length. "
                           f"{_context(group)}.", figure)
    for (section, model, *_), members in families.items():
        stem = f"{section}-{slugify(model_stem(model))}"
        family = evals.family(section)
        if family.figure == "by_category":
            figure = by_category(members, labels, styles, family.categories)
            title, caption = f"{section}: score by category", (
                f"{section} mean task score per category and their mean (overall), one panel per context length; "
                "hatched: log-n variants. "
                f"{_context(members[0]).split(' (dotted line)')[0]}.")
        else:
            figure = tasks_by_length(members, labels, styles)
            title, caption = f"{section} tasks: {members[0].headline[0].name} by length", (
                f"{section} tasks' {members[0].headline[0].name} by context length, one panel per task. "
                f"{_context(members[0])}.")
        if figure is not None:
            yield Plot(stem, section, model, title, caption, figure)


def save(plot: Plot, directory: Path, formats: Iterable[str] = FORMATS) -> dict[str, Path]:
    """Write the figure once per format; the PNG at 300 dpi. Metadata dates are dropped so reruns are identical."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None, "ModDate": None},
                "svg": {"Date": None}}
    with matplotlib.rc_context(STYLE):
        for fmt in formats:
            path = directory / f"{plot.stem}.{fmt}"
            plot.figure.savefig(path, format=fmt, metadata=metadata.get(fmt), bbox_inches="tight",
                                pad_inches=0.03, facecolor="white")
            paths[fmt] = path
            plot.figure.set_layout_engine("none")  # laid out once: the other formats reuse the positions
    return paths


def render(records: list[dict[str, Any]], directory: Path) -> list[tuple[Plot, dict[str, Path]]]:
    """Draw and save every figure; returns each with its files (figures are released after saving)."""
    return render_plots(figures(records), directory)


def render_plots(plots: Iterable[Plot], directory: Path) -> list[tuple[Plot, dict[str, Path]]]:
    """Draw (under the paper style: a generator draws as it is iterated) and save ``plots`` one at a time, with
    unique stems."""
    out = []
    stems: dict[str, int] = {}
    with matplotlib.rc_context(STYLE):
        for plot in plots:
            stems[plot.stem] = stems.get(plot.stem, 0) + 1
            if stems[plot.stem] > 1:  # same task and model under different settings
                plot.stem = f"{plot.stem}-{stems[plot.stem]}"
            out.append((plot, save(plot, directory)))
            plot.figure.clear()
    return out
