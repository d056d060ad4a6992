"""How lctx's figures look, shared by everything that draws one (the report's figures, the correlation and
trend figures, ``lctx analyze``): the paper style, one style per variant, the figure widths, the axis, legend and
label helpers, and :class:`Plot`, the finished figure the dashboard shows.

Each variant keeps one style in every figure: the hue of its RoPE family as the family declares it
(:class:`lctx.patches.Family`), a lighter or darker shade per distinct label of the family (in sorted order), the
family's marker for the variant, and a dashed line for ``logn=true``. Figures use matplotlib's object API (no
pyplot, no global backend) under a paper style: 8 pt type, no top/right spines, faint grid, TrueType fonts
embedded in PDFs, text as paths in SVGs (so the dashboard needs no fonts).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colors as mcolors
from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

from lctx.evals import Metric
from lctx.spec import format_length
from lctx.view import frame as frames
from lctx.view.frame import Group

STYLE: dict[str, Any] = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.6,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.4,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.minor.visible": False,
    "ytick.minor.visible": False,
    "lines.linewidth": 1.3,
    "lines.markersize": 3.5,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": 300,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "path",
    "svg.hashsalt": "lctx",  # stable element ids: the same figure gives the same SVG
}
COLUMN_WIDTH, PAGE_WIDTH = 3.4, 6.9  # inches: one and two columns of a two-column paper

UNKNOWN_COLOR, UNKNOWN_MARKER = "#888888", "o"  # variants this lctx does not know (old records)
LIGHTNESS_STEPS = (0.0, 0.22, -0.16, 0.36, -0.28, 0.48)  # shades of one family's hue, in member order
RETRIEVAL_CMAP = "viridis"


@dataclass(frozen=True)
class Style:
    color: str
    marker: str
    linestyle: str


def variant_styles(labels: dict[str, str]) -> dict[str, Style]:
    """One style per variant label (``labels``: canonical rope -> label), from the variant's declared family."""
    members: dict[str, list[str]] = {}
    facts: dict[str, tuple[Any, int, bool]] = {}
    for rope, label in sorted(labels.items(), key=lambda item: item[1]):
        family, index, logn = frames.variant_family(rope)
        facts[label] = (family, index, logn)
        members.setdefault(family.name if family else "", []).append(label)
    styles = {}
    for names in members.values():
        family = facts[names[0]][0]
        colors = _shades(family.color, len(names)) if family else [UNKNOWN_COLOR] * len(names)
        for color, label in zip(colors, names, strict=True):
            _, index, logn = facts[label]
            marker = family.markers[index % len(family.markers)] if family else UNKNOWN_MARKER
            styles[label] = Style(color, marker, "--" if logn else "-")
    return styles


def _shades(base: str, n: int) -> list[str]:
    """``n`` distinct shades of a hue: the colour itself first, then lighter and darker ones alternately."""
    h, lightness, s = colorsys.rgb_to_hls(*mcolors.to_rgb(base))
    out: list[str] = []
    taken: list[float] = []
    steps = [*LIGHTNESS_STEPS, *np.linspace(-0.4, 0.6, 12)]
    for step in steps:
        level = min(max(lightness + step, 0.0), 0.82)
        if all(abs(level - t) >= 0.09 for t in taken):
            taken.append(level)
            out.append(mcolors.to_hex(colorsys.hls_to_rgb(h, level, s)))
        if len(out) == n:
            return out
    return (out * n)[:n]  # more members than distinguishable shades: repeat (markers and labels still differ)


@dataclass
class Plot:
    """A finished figure with what the dashboard says about it."""

    stem: str  # file name stem under figures/
    section: str  # task family it belongs to
    model: str
    title: str
    caption: str
    figure: Figure


# ---- helpers -----------------------------------------------------------------------------------------------


def length_axis(ax, lengths: list[int], train_len: int | None) -> None:
    """log2 x axis with a tick per evaluated length (labelled 4k, 8k, …) and room for the training length."""
    ax.set_xscale("log", base=2)
    span = lengths + ([train_len] if train_len else [])
    ax.set_xlim(min(span) / 1.25, max(span) * 1.25)
    ax.xaxis.set_major_locator(ticker.FixedLocator(lengths))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([format_length(n) for n in lengths]))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel("context length (tokens)")
    if train_len:
        train_line(ax, train_len)


def train_line(ax, train_len: int, label: bool = True) -> None:
    ax.axvline(train_len, color="0.35", linestyle=":", linewidth=0.9, zorder=1)
    if label:
        ax.text(train_len, 0.99, " train", transform=blended_transform_factory(ax.transData, ax.transAxes),
                ha="left", va="top", fontsize=6.5, color="0.35")


def _nice_log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis that read as plain numbers: 1-2-5 per decade, or finer when the range is narrow."""
    for subs in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 8)):
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for m in subs]
        inside = [t for t in ticks if lo <= t <= hi]
        if len(inside) >= 3:
            return inside
    return list(ticker.MaxNLocator(4).tick_values(lo, hi))


def _plain(value: float, _pos: Any = None) -> str:
    if value >= 1e5:
        exponent = math.floor(math.log10(value))
        mantissa = value / 10 ** exponent
        return f"$10^{{{exponent}}}$" if abs(mantissa - 1) < 1e-9 else f"${mantissa:g}\\times10^{{{exponent}}}$"
    return f"{value:g}"


def log_axis(ax, values: list[float], which: str = "y") -> None:
    """A log scale over ``values`` (positive) with ticks that read as plain numbers."""
    lo, hi = min(values), max(values)
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    pad = (hi / lo) ** 0.06 if hi > lo else 1.1
    (ax.set_ylim if which == "y" else ax.set_xlim)(lo / pad, hi * pad)
    axis.set_major_locator(ticker.FixedLocator(_nice_log_ticks(lo / pad, hi * pad)))
    axis.set_major_formatter(ticker.FuncFormatter(_plain))
    axis.set_minor_locator(ticker.NullLocator())


def tokens(value: float, _pos: Any = None) -> str:
    return f"{value / 1024:.3g}k" if value >= 1024 else f"{value:.0f}"


def panel_grid(n: int, max_cols: int) -> tuple[int, int]:
    """Rows and columns for ``n`` panels, balanced (4 panels: 2 × 2, not 3 + 1)."""
    rows = math.ceil(n / max_cols)
    return rows, math.ceil(n / rows)


def legend(fig: Figure, handles: list) -> None:
    """One legend below the panels: three columns on a two-column-wide figure, two on a narrow one."""
    if handles:
        ncols = min(len(handles), 3 if fig.get_figwidth() > COLUMN_WIDTH else 2)
        fig.legend(handles=handles, loc="outside lower center", ncols=ncols, handlelength=2.2, columnspacing=1.2)


def variant_handles(labels: list[str], styles: dict[str, Style]) -> list[Line2D]:
    return [Line2D([], [], color=styles[x].color, marker=styles[x].marker, linestyle=styles[x].linestyle,
                   label=x) for x in labels]


def wrap(label: str, chars: int) -> str:
    """Break a long variant label at its ``:`` separators so that a panel title fits over its panel."""
    lines = [""]
    for i, part in enumerate(label.split(":")):
        piece = part if i == 0 else ":" + part
        if lines[-1] and len(lines[-1]) + len(piece) > chars:
            lines.append(piece)
        else:
            lines[-1] += piece
    return "\n".join(lines)


def metric_label(metric: Metric, group: Group) -> str:
    """The metric's declared label, filled with the group's parameters (``perplexity, last 256 tokens``)."""
    try:
        return (metric.label or metric.name).format(**group.config)
    except (KeyError, IndexError, ValueError):
        return metric.label or metric.name


def axis_label(metric: Metric) -> str:
    name = metric.label.split(",")[0] if metric.label else metric.name
    direction = {True: " (higher is better)", False: " (lower is better)"}.get(metric.higher_is_better, "")
    return name + direction
