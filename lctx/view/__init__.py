"""The view: records turned into tables, summaries, figures, a static dashboard and a regression gate.

One layer renders every output from the same cells (:mod:`lctx.view.frame`), so ``lctx results`` (the console),
``table.md`` (written by every run), ``lctx report`` (Markdown, CSV, LaTeX, figures, HTML) and the gate never
disagree. Layout of a report directory (``--out``, default ``report/``; ``lctx eval`` writes it under its results
directory)::

    index.html            the dashboard: every table, summary and figure (SVG inline), no network requests
    tables.md, tables.tex every table and summary (Markdown with sections per task; LaTeX booktabs floats)
    tables/<slug>.csv     one table per file: raw numbers, OOM/ERR for failed cells
    tables/<slug>.tex     one booktabs float per file, ready to \\input
    figures/<stem>.png    every figure (300 dpi), also as .pdf and .svg: the tasks' own, the perplexity ↔ task
                          scatter (correlation-*), the trends over runs (trend-*)
    gate.md               with --baseline: regressions, improvements, changes within noise and unmatched cells

Entry points: :func:`load` (a results directory), :func:`console` (what ``lctx results`` prints),
:func:`markdown` (``table.md``), :func:`write` (a report of records in hand) and :func:`report` (a directory,
an archive or a URL, with a baseline and history from any of those: :mod:`lctx.pack`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lctx import evals, pack, results
from lctx.view import analysis, dashboard, figures, frame, gate, history, plotting, summaries, tables
from lctx.view.gate import GateResult, Tolerance, parse_tolerance

__all__ = ["GateResult", "Report", "ReportError", "Tolerance", "console", "load", "markdown", "parse_tolerance",
           "report", "write"]


class ReportError(ValueError):
    """A results directory that does not exist or holds no records."""


@dataclass
class Report:
    """What a report run wrote, and the gate's verdict when there was a baseline."""

    out: Path
    index: Path
    tables: list[tables.Table]
    files: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    gate: GateResult | None = None
    fail_on_missing: bool = False
    summary: Path | None = None
    skipped: dict[str, results.Skipped] = field(default_factory=dict)  # unreadable record lines, by directory

    @property
    def passed(self) -> bool:
        return self.gate is None or self.gate.passed(self.fail_on_missing)


def newest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest record of every cell, in today's form (records of schema 1 upgraded; records written before
    model fingerprints take their model's fingerprint when the other records agree on one)."""
    upgraded = [evals.upgrade(r) for r in records]
    known: dict[str, set[str]] = {}
    for record in upgraded:
        if record.get("model_fingerprint"):
            known.setdefault(record["model"], set()).add(record["model_fingerprint"])
    for record in upgraded:
        if "model_fingerprint" not in record:
            only = known.get(record.get("model"), set())
            record["model_fingerprint"] = next(iter(only)) if len(only) == 1 else None
    return list(results.newest(upgraded).values())


def load(directory: str | Path, what: str = "results directory") -> tuple[list[dict[str, Any]], results.Skipped]:
    """The newest record of every cell under ``directory`` and what could not be read; ReportError when there
    is no record."""
    root = Path(directory)
    if not root.is_dir():
        raise ReportError(f"{what} {str(root)!r} does not exist (lctx eval writes to --out, default results/)")
    store = results.Store(root)
    records = newest(store.read())
    if not records:
        why = f" ({store.skipped.describe()})" if store.skipped else ""
        raise ReportError(f"{what} {str(root)!r} has no records (records*.jsonl){why}: run lctx eval --out {root} "
                          "first")
    return records, store.skipped


def every_summary(records: list[dict[str, Any]], threshold: float | None = None, relative: float | None = None,
                  found: list[analysis.Correlation] | None = None) -> list[summaries.Summary]:
    """Category averages, effective lengths (RULER's ``threshold``, NoLiMa's ``relative`` ratio) and the
    perplexity ↔ task correlations: what every output shows under its tables."""
    return summaries.build(records, threshold, relative) + analysis.correlation_summaries(records, found)


def console(records: list[dict[str, Any]], *, metric: str | None = None, by_depth: bool = False,
            threshold: float | None = None, relative: float | None = None) -> list[Any]:
    """The rich tables ``lctx results`` prints: every table, then (for the headline metrics) the summaries."""
    out = [tables.to_rich(t) for t in tables.build(records, metric=metric, by_depth=by_depth)]
    if metric is None:
        out += [s.to_rich() for s in every_summary(records, threshold, relative)]
    return out


def markdown(records: list[dict[str, Any]], threshold: float | None = None, relative: float | None = None) -> str:
    """Every table and summary as Markdown (``table.md``, the report's ``tables.md``)."""
    return tables.to_markdown(tables.build(records), every_summary(records, threshold, relative))


def analyses(directory: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """The ``lctx analyze`` outputs (``analysis.json``) under a results directory, e.g. ``lctx analyze --out
    results/analysis``; unreadable ones are left out."""
    found = []
    for path in sorted(Path(directory).rglob("analysis.json")):
        try:
            found.append((path.parent, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
    return found


def write(records: list[dict[str, Any]], out: str | Path, *, title: str, description: str | None = None,
          source: str = "", baseline: list[dict[str, Any]] | None = None, baseline_source: str | None = None,
          tolerance: Tolerance | str = "2%", fail_on_missing: bool = False, summary_md: str | Path | None = None,
          draw: bool = True, threshold: float | None = None, relative: float | None = None, noise: bool = True,
          runs: list[dict[str, Any]] | None = None, manifests: dict[str, dict[str, Any]] | None = None,
          analyses_from: str | Path | None = None) -> Report:
    """Write the tables, summaries, figures and dashboard of ``records`` under ``out`` (and the gate against
    ``baseline``). ``draw=False`` skips the figures (seconds each on a CPU), for a gate-only CI job. ``runs``:
    every record of every run (with their ``manifests`` by run id), for the history section when there are
    several. ``analyses_from``: a directory whose ``lctx analyze`` outputs to show (default ``source``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = frame.revive(records)
    tolerance = parse_tolerance(tolerance) if isinstance(tolerance, str) else tolerance
    table_list = tables.build(records)
    found = analysis.correlations(records)
    summary_list = every_summary(records, threshold, relative, found)
    written: list[Path] = []
    table_files: dict[str, dict[str, str]] = {}
    for table in table_list:
        csv_path = _write(out / "tables" / f"{table.slug}.csv", tables.to_csv(table))
        tex_path = _write(out / "tables" / f"{table.slug}.tex", tables.to_latex(table))
        written += [csv_path, tex_path]
        table_files[table.slug] = {"CSV": f"tables/{csv_path.name}", "LaTeX": f"tables/{tex_path.name}"}
    written.append(_write(out / "tables.md", tables.to_markdown(table_list, summary_list)))
    written.append(_write(out / "tables.tex", "% lctx report: every table (needs \\usepackage{booktabs})\n\n"
                          + "\n".join(tables.to_latex(t) for t in table_list)))
    result = None
    if baseline is not None:
        result = gate.compare(records, frame.revive(baseline), tolerance, noise)
        written.append(_write(out / "gate.md", result.to_markdown(fail_on_missing)))
    trend = history.trend(runs, manifests or {}, tolerance, noise) if runs else None
    labels = frame.variant_labels([*records, *(runs or [])])
    rendered = figures.render(records, out / "figures") if draw else []
    correlation_plots = figures.render_plots(analysis.figures(records, found), out / "figures") if draw else []
    flagged = {change.key for change in result.regressions} if result is not None else set()
    trend_plots = (figures.render_plots(history.figures(trend, labels, flagged), out / "figures")
                   if draw and trend is not None else [])
    figure_files = [path for _, paths in [*rendered, *correlation_plots, *trend_plots] for path in paths.values()]
    where = analyses_from if analyses_from is not None else source
    page = dashboard.Page(title=title, description=description, records=records, tables=table_list,
                          plots=rendered, styles=plotting.variant_styles(frame.variant_labels(records)), out=out,
                          source=source, summaries=summary_list, analyses=analyses(where) if where else [],
                          gate=result, fail_on_missing=fail_on_missing, baseline=baseline_source,
                          correlation_plots=correlation_plots, trend=trend, trend_plots=trend_plots)
    index = _write(out / "index.html", dashboard.render(page, table_files))
    summary = _write(Path(summary_md), dashboard.summary_markdown(page)) if summary_md else None
    return Report(out=out, index=index, tables=table_list, files=[index, *written], figures=figure_files,
                  gate=result, fail_on_missing=fail_on_missing, summary=summary)


def _write(path: Path, text: str) -> Path:
    results.write_text(path, text)
    return path


def _bundle(source: str | Path, what: str) -> pack.Bundle:
    """A source's records (every run's) and manifests; ReportError when it has no record."""
    try:
        bundle = pack.load(source, what)
    except pack.PackError as err:
        raise ReportError(str(err)) from None
    if not bundle.records:
        why = f" ({bundle.skipped.describe()})" if bundle.skipped else ""
        hint = f": run lctx eval --out {source} first" if bundle.directory is not None else ""
        raise ReportError(f"{what} {str(source)!r} has no records (records*.jsonl){why}{hint}")
    return bundle


def writable(directory: Path, what: str) -> None:
    """ReportError now (before any work, creating nothing) when ``directory`` could not be created or written."""
    problem = results.unwritable(directory)
    if problem:
        raise ReportError(f"{what} {str(directory)!r} cannot be written: {problem}")


def report(results_dir: str | Path, out: str | Path, *, baseline: str | Path | None = None,
           history_sources: Sequence[str | Path] = (), tolerance: Tolerance | str = "2%", fail_on_missing: bool = False,
           summary_md: str | Path | None = None, title: str | None = None, description: str | None = None,
           draw: bool = True, threshold: float | None = None, relative: float | None = None,
           noise: bool = True) -> Report:
    """``lctx report``: read ``results_dir`` (and ``baseline``, and the ``history_sources``; each a directory, an
    archive or a URL) and write the report under ``out``. The history section covers every run of
    ``results_dir`` and of the history sources."""
    tolerance = parse_tolerance(tolerance) if isinstance(tolerance, str) else tolerance  # fail before any work
    current = _bundle(results_dir, "results directory")
    base_bundle = _bundle(baseline, "baseline") if baseline is not None else None
    past = [_bundle(source, "history source") for source in history_sources]
    writable(Path(out), "--out")  # checked before anything is written: a gate verdict is never lost to a bad path
    if summary_md is not None:
        writable(Path(summary_md).parent, "--summary-md")
    runs, manifests = pack.merge([current, *past])
    if title is None:
        title = current.directory.resolve().name if current.directory is not None else pack.name(results_dir)
    written = write(newest(current.records), out, title=title, description=description, source=str(results_dir),
                    baseline=None if base_bundle is None else newest(base_bundle.records),
                    baseline_source=None if baseline is None else str(baseline), tolerance=tolerance,
                    fail_on_missing=fail_on_missing, summary_md=summary_md, draw=draw, threshold=threshold,
                    relative=relative, noise=noise, runs=runs, manifests=manifests,
                    analyses_from=current.directory or "")
    written.skipped = {str(where): bundle.skipped for where, bundle in ((results_dir, current), (baseline, base_bundle))
                       if bundle is not None and bundle.skipped}
    return written
