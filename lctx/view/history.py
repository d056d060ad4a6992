"""History: records of several runs as a trend of each cell's headline metric, gated run by run.

A **run** is the records sharing a ``run_id`` (one ``lctx eval`` or ``lctx sweep``); its provenance is its
manifest's (start time, git revision, lctx and package versions, device) or, without a manifest (a
``records.jsonl`` fetched alone), what its records say (``lctx_version``, the earliest ``finished_at``). Runs
are ordered by start time. Within a run a cell's newest record counts.

A cell's **trend** is its headline metric (a task's first) in every run that measured it. Each observation is
judged against the cell's previous observation by the regression gate's own rule
(:func:`lctx.view.gate.judge`: the tolerance as the floor, widened by the change's noise), so a regression
injected in one run is flagged at that run. The trend figures mark those points, and the cells the report's
``--baseline`` gate flagged, on their latest observation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

from lctx import results
from lctx.evals import Metric
from lctx.spec import format_length
from lctx.view import frame as frames
from lctx.view import gate, tables
from lctx.view import plotting as plots
from lctx.view.frame import Value
from lctx.view.gate import CellKey, Change, Tolerance

HISTORY_ROWS = 20  # runs listed in the dashboard's table (newest first)
REGRESSION_COLOR, BASELINE_COLOR = "#cf222e", "#000000"


@dataclass
class Run:
    """One run: its id, provenance and the newest record of each cell it wrote."""

    run_id: str
    started: str  # ISO-8601 UTC
    revision: str | None
    dirty: bool
    lctx_version: str | None
    packages: dict[str, Any]
    device: str | None
    records: list[dict[str, Any]]

    @property
    def label(self) -> str:
        """The git revision (7 characters, ``+`` when the checkout had local changes), else the run id."""
        if self.revision:
            return self.revision[:7] + ("+" if self.dirty else "")
        return self.run_id[:12]

    @property
    def when(self) -> str:
        return self.started[:16].replace("T", " ")


def runs(records: Iterable[dict[str, Any]], manifests: dict[str, dict[str, Any]]) -> list[Run]:
    """The records split by run, with their manifests' provenance, oldest first."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in frames.revive(records):
        by_id.setdefault(str(record.get("run_id") or "unknown"), []).append(record)
    out = []
    for run_id, mine in by_id.items():
        manifest = manifests.get(run_id) or {}
        git = manifest.get("git") or {}
        device = manifest.get("device") or {}
        finished = sorted(str(r.get("finished_at")) for r in mine if r.get("finished_at"))
        started = str(manifest.get("started_at") or (finished[0] if finished else ""))
        out.append(Run(run_id=run_id, started=started, revision=git.get("revision"), dirty=bool(git.get("dirty")),
                       lctx_version=manifest.get("lctx_version") or mine[0].get("lctx_version"),
                       packages=manifest.get("packages") or {},
                       device=" ".join(str(device[k]) for k in ("type", "name") if device.get(k)) or None,
                       records=list(results.newest(mine).values())))
    return sorted(out, key=lambda run: (run.started, run.run_id))


@dataclass
class Observation:
    run: int  # index in Trend.runs
    value: Value
    change: Change | None = None  # the gate's verdict against the cell's previous observation, when it moved
    verdict: int = 0  # -1 regression, 1 improvement, 0 neither


@dataclass
class Series:
    key: CellKey
    label: str  # the variant as typed
    metric: Metric
    points: list[Observation] = field(default_factory=list)


@dataclass
class Trend:
    runs: list[Run]
    series: list[Series]  # cells observed in two runs or more
    tolerance: Tolerance
    noise: bool

    @property
    def regressions(self) -> list[tuple[Run, Change]]:
        """Every regression between consecutive observations of a cell, by run."""
        found = [(p.run, p.change) for s in self.series for p in s.points if p.verdict < 0 and p.change]
        return [(self.runs[i], change) for i, change in sorted(found, key=lambda item: item[0])]

    def regressions_in(self, run: Run) -> int:
        return sum(1 for r, _ in self.regressions if r is run)


def trend(records: Iterable[dict[str, Any]], manifests: dict[str, dict[str, Any]], tolerance: Tolerance,
          noise: bool = True) -> Trend | None:
    """Each cell's headline metric over the runs; None unless some cell was measured in two runs or more."""
    history = runs(records, manifests)
    if len(history) < 2:
        return None
    by_key: dict[CellKey, Series] = {}
    for index, run in enumerate(history):
        headline = [t for t in tables.build(run.records) if t.metric == t.group.headline[0]]
        for key, (value, label, metric) in gate.cells(headline).items():
            if value is not None:
                by_key.setdefault(key, Series(key, label, metric)).points.append(Observation(index, value))
    series = [s for s in by_key.values() if len(s.points) > 1]
    if not series:
        return None
    for s in series:
        for before, now in zip(s.points, s.points[1:], strict=False):
            verdict, reason, spread = gate.judge(before.value, now.value, s.metric.higher_is_better, tolerance, noise)
            if verdict:
                now.verdict = verdict
                now.change = Change(s.key, s.label, before.value, now.value, s.metric, reason, spread)
    return Trend(history, series, tolerance, noise)


# ---- figures -----------------------------------------------------------------------------------------------


def _panel(ax, trend_: Trend, members: list[Series], styles: dict[str, plots.Style],
           flagged: set[CellKey]) -> tuple[bool, bool]:
    """One length's lines; returns whether it marked a regression against the previous run, and one against the
    baseline."""
    top = blended_transform_factory(ax.transData, ax.transAxes)
    marked = baseline_marked = False
    values: list[float] = []
    for s in members:
        style = styles.get(s.label, plots.Style(plots.UNKNOWN_COLOR, plots.UNKNOWN_MARKER, "-"))
        points = [(p.run, p.value.value) for p in s.points if p.value.finite]
        values += [y for _, y in points]
        ax.plot([x for x, _ in points], [y for _, y in points], color=style.color, marker=style.marker,
                linestyle=style.linestyle, zorder=3)
        for p in s.points:
            finite = p.value.finite
            y, transform = (p.value.value, ax.transData) if finite else (1.0, top)
            if not finite:  # out of memory or an error: a cross at the top of the panel
                ax.plot([p.run], [y], marker="x", color=style.color, transform=transform, clip_on=False,
                        linestyle="none", zorder=4)
            if p.verdict < 0:
                ax.plot([p.run], [y], marker="o", markersize=9, markerfacecolor="none", markeredgewidth=1.4,
                        color=REGRESSION_COLOR, transform=transform, clip_on=False, linestyle="none", zorder=5)
                marked = True
        if s.key in flagged:
            last = s.points[-1]
            finite = last.value.finite
            ax.plot([last.run], [last.value.value if finite else 1.0], marker="s", markersize=11,
                    markerfacecolor="none", markeredgewidth=1.0, color=BASELINE_COLOR,
                    transform=ax.transData if finite else top, clip_on=False, linestyle="none", zorder=5)
            baseline_marked = True
    metric = members[0].metric
    if metric.percent:
        ax.set_ylim(-0.04, 1.04)
        ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
    elif metric.higher_is_better is False and values and min(values) > 0 and max(values) > 3 * min(values):
        plots.log_axis(ax, values)  # a loss that blew up: the log scale keeps the other lines readable
    else:
        ax.ticklabel_format(axis="y", useOffset=False)
    return marked, baseline_marked


def figure(trend_: Trend, members: list[Series], styles: dict[str, plots.Style],
           flagged: set[CellKey]) -> Figure:
    """Small multiples, one panel per length: the metric over runs (x: runs in time order, labelled by git
    revision and date), a line per variant; red rings: regressions against the previous run; black squares:
    regressions against the report's baseline; ✕: out of memory or error."""
    lengths = sorted({s.key.length for s in members})
    cols = min(3, len(lengths))
    rows = math.ceil(len(lengths) / cols)
    fig = Figure(figsize=(plots.COLUMN_WIDTH if cols == 1 else plots.PAGE_WIDTH, 0.9 + 2.0 * rows),
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    shown = sorted({p.run for s in members for p in s.points})
    labels = {i: f"{trend_.runs[i].label}\n{trend_.runs[i].when[5:10]}" for i in shown}
    marks = [False, False]
    for idx, ax in enumerate(axes.flat):
        if idx >= len(lengths):
            ax.set_visible(False)
            continue
        n = lengths[idx]
        here = [s for s in members if s.key.length == n]
        marks = [a or b for a, b in zip(marks, _panel(ax, trend_, here, styles, flagged), strict=True)]
        ax.set_xlim(min(shown) - 0.4, max(shown) + 0.4)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=8, integer=True))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: labels.get(int(round(v)), "")))
        ax.tick_params(axis="x", labelsize=5.5)
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_title(f"length {format_length(n)}")
        if idx % cols == 0:
            ax.set_ylabel(members[0].metric.name)
    handles = plots.variant_handles(list(dict.fromkeys(s.label for s in members)), styles)
    if marks[0]:
        handles.append(Line2D([], [], marker="o", markerfacecolor="none", color=REGRESSION_COLOR, linestyle="none",
                              label="regression vs the previous run"))
    if marks[1]:
        handles.append(Line2D([], [], marker="s", markerfacecolor="none", color=BASELINE_COLOR, linestyle="none",
                              label="regression vs the baseline"))
    plots.legend(fig, handles)
    return fig


def figures(trend_: Trend, labels: dict[str, str], flagged: set[CellKey] = frozenset()) -> Iterator[plots.Plot]:
    """One trend figure per task, model and settings (``labels``: canonical rope -> label of every record)."""
    styles = plots.variant_styles(labels)
    groups: dict[tuple[str, str, str], list[Series]] = {}
    for s in trend_.series:
        groups.setdefault((s.key.task, s.key.model, s.key.settings), []).append(s)
    for (task, model, settings), members in groups.items():
        metric = members[0].metric.name
        yield plots.Plot(f"trend-{tables.slugify(task)}-{tables.slugify(tables.model_stem(model))}", "history",
                         model, f"{task}: {metric} over runs · {model}",
                         f"{task} {metric} of every cell measured in two runs or more, one panel per length, runs in "
                         f"time order (x: git revision and date); red rings: regressions against the previous run "
                         f"(gate: {trend_.tolerance}{' or the noise' if trend_.noise else ''}); black squares: "
                         f"regressions against the baseline; ✕: out of memory or error. {model}, {settings}.",
                         figure(trend_, members, styles, flagged))
