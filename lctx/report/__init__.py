"""``lctx report``: tables, figures, a static dashboard and a regression gate from a results directory.

Layout of a report directory (``--out``, default ``report/``)::

    index.html            the dashboard: every table and figure (SVG inline), no network requests
    tables.md, tables.tex every table (Markdown with sections per task; LaTeX booktabs floats)
    tables/<slug>.csv     one table per file: raw numbers, OOM/ERR for failed cells
    tables/<slug>.tex     one booktabs float per file, ready to \\input
    figures/<stem>.png    every figure (300 dpi), also as .pdf and .svg
    gate.md               with --baseline: regressions, improvements and unmatched cells

Entry points: :func:`report` (a results directory, as the CLI calls it) and :func:`write` (records in hand).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lctx import results
from lctx.report import cells, dashboard, gate, plots, tables
from lctx.report.gate import GateResult, Tolerance, parse_tolerance

__all__ = ["Report", "ReportError", "GateResult", "Tolerance", "load", "parse_tolerance", "report", "write"]


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

    @property
    def passed(self) -> bool:
        return self.gate is None or self.gate.passed(self.fail_on_missing)


def load(directory: str | Path, what: str = "results directory") -> list[dict[str, Any]]:
    """The latest record of every cell under ``directory``; ReportError when there is none."""
    root = Path(directory)
    if not root.is_dir():
        raise ReportError(f"{what} {str(root)!r} does not exist (lctx eval writes to --out, default results/)")
    records = results.Store(root).records()
    if not records:
        raise ReportError(f"{what} {str(root)!r} has no records (records*.jsonl): run lctx eval --out {root} first")
    return records


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write(records: list[dict[str, Any]], out: str | Path, *, title: str, description: str | None = None,
          source: str = "", baseline: list[dict[str, Any]] | None = None, baseline_source: str | None = None,
          tolerance: Tolerance | str = "2%", fail_on_missing: bool = False,
          summary_md: str | Path | None = None, figures: bool = True) -> Report:
    """Write the tables, figures and dashboard of ``records`` under ``out`` (and the gate against ``baseline``).

    ``figures=False`` skips the figures (seconds each on a CPU), for a gate-only CI job.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = cells.revive(records)
    table_list = tables.build(records)
    written: list[Path] = []
    table_files: dict[str, dict[str, str]] = {}
    for table in table_list:
        csv_path = _write(out / "tables" / f"{table.slug}.csv", tables.to_csv(table))
        tex_path = _write(out / "tables" / f"{table.slug}.tex", tables.to_latex(table))
        written += [csv_path, tex_path]
        table_files[table.slug] = {"CSV": f"tables/{csv_path.name}", "LaTeX": f"tables/{tex_path.name}"}
    written.append(_write(out / "tables.md", tables.to_markdown(table_list)))
    written.append(_write(out / "tables.tex", "% lctx report: every table (needs \\usepackage{booktabs})\n\n"
                          + "\n".join(tables.to_latex(t) for t in table_list)))
    rendered = plots.render(records, out / "figures") if figures else []
    figure_files = [path for _, paths in rendered for path in paths.values()]
    result = None
    if baseline is not None:
        tolerance = parse_tolerance(tolerance) if isinstance(tolerance, str) else tolerance
        result = gate.compare(records, cells.revive(baseline), tolerance)
        written.append(_write(out / "gate.md", result.to_markdown(fail_on_missing)))
    labels = cells.variant_labels(records)
    page = dashboard.Page(title=title, description=description, records=records, tables=table_list,
                          plots=rendered, styles=plots.variant_styles(labels.values()), out=out, source=source,
                          gate=result, fail_on_missing=fail_on_missing, baseline=baseline_source)
    index = _write(out / "index.html", dashboard.render(page, table_files))
    summary = _write(Path(summary_md), dashboard.summary_markdown(page)) if summary_md else None
    return Report(out=out, index=index, tables=table_list, files=[index, *written], figures=figure_files,
                  gate=result, fail_on_missing=fail_on_missing, summary=summary)


def report(results_dir: str | Path, out: str | Path, *, baseline: str | Path | None = None,
           tolerance: Tolerance | str = "2%", fail_on_missing: bool = False, summary_md: str | Path | None = None,
           title: str | None = None, description: str | None = None, figures: bool = True) -> Report:
    """``lctx report``: read ``results_dir`` (and ``baseline``) and write the report under ``out``."""
    tolerance = parse_tolerance(tolerance) if isinstance(tolerance, str) else tolerance  # fail before any work
    records = load(results_dir)
    base = load(baseline, "baseline directory") if baseline is not None else None
    name = title or Path(results_dir).resolve().name
    return write(records, out, title=name, description=description, source=str(results_dir), baseline=base,
                 baseline_source=None if baseline is None else str(baseline), tolerance=tolerance,
                 fail_on_missing=fail_on_missing, summary_md=summary_md, figures=figures)
