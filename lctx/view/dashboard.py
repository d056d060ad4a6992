"""A self-contained static ``index.html`` (tables and SVG figures inline, no network requests) and a compact
Markdown summary for CI job pages.

The page carries a Content-Security-Policy that allows inline styles and ``data:`` images only, so a browser
opening the artifact fetches nothing, even if a later edit slips in an external URL. Links to the PNG/PDF
files, tables and CSV/LaTeX files are relative, so the report directory can be moved or zipped as a whole.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lctx.spec import format_length
from lctx.view import sections as extra
from lctx.view.gate import GateResult, markdown_table
from lctx.view.history import Trend
from lctx.view.markup import anchor, e, figure_html, plain_table, svg_image
from lctx.view.plotting import Plot, Style
from lctx.view.summaries import Summary
from lctx.view.tables import Table, interval_text, sections, table_markdown

SUMMARY_ROWS = 25  # rows per gate list in the Markdown summary (gate.md has them all)
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --best: #dafbe1; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header, main, footer { max-width: 1180px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 24px; border-bottom: 1px solid var(--line); }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 36px 0 8px; }
h3 { font-size: 15px; margin: 24px 0 6px; font-weight: 600; }
.muted, figcaption, .note { color: var(--muted); font-size: 13px; }
.description { white-space: pre-line; max-width: 900px; }
nav { margin: 12px 0 16px; } nav a { margin-right: 14px; }
a { color: #0969da; text-decoration: none; } a:hover { text-decoration: underline; }
.stats { display: flex; flex-wrap: wrap; gap: 8px 24px; margin: 8px 0 16px; font-size: 13px; }
.stats b { font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 13px; margin: 4px 0 6px; }
th, td { padding: 3px 10px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
thead th { border-bottom: 2px solid var(--fg); font-weight: 600; }
th.variant, td.variant { text-align: left; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
th.past, td.past { background: var(--soft); }
td.best { font-weight: 700; background: var(--best); }
td.oom { color: #9a6700; } td.error { color: #cf222e; } td.missing { color: #8c959f; }
.ci { color: var(--muted); font-size: 11px; margin-left: 4px; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 7px;
          vertical-align: -1px; }
.files { font-size: 12px; }
figure { margin: 18px 0 28px; } figure img { display: block; max-width: 100%; height: auto; }
.gate { padding: 10px 16px; margin: 20px 0; border-left: 5px solid; background: var(--soft); }
.gate.pass { border-color: #1a7f37; } .gate.fail { border-color: #cf222e; }
.gate .verdict { font-weight: 600; font-size: 15px; }
details { margin: 10px 0; } summary { cursor: pointer; }
footer { margin-top: 40px; padding: 16px 24px 32px; border-top: 1px solid var(--line); }
h4 { font-size: 13px; margin: 16px 0 4px; font-weight: 600; }
""" + extra.CSS


@dataclass
class Page:
    """Everything the dashboard shows."""

    title: str
    description: str | None
    records: list[dict[str, Any]]
    tables: list[Table]
    plots: list[tuple[Plot, dict[str, Path]]]  # figure and its files (png, pdf, svg)
    styles: dict[str, Style]  # by variant label
    out: Path  # the report directory: links are relative to it
    source: str  # the results directory, as given
    summaries: list[Summary] = field(default_factory=list)  # category averages, effective lengths
    analyses: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)  # lctx analyze outputs: (dir, json)
    gate: GateResult | None = None
    fail_on_missing: bool = False
    baseline: str | None = None
    correlation_plots: list[tuple[Plot, dict[str, Path]]] = field(default_factory=list)  # PPL against task scores
    trend: Trend | None = None  # the history of runs, when there are several
    trend_plots: list[tuple[Plot, dict[str, Path]]] = field(default_factory=list)

    def summaries_of(self, kind: str) -> list[Summary]:
        return [s for s in self.summaries if s.kind == kind]


def stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    status = Counter(r.get("status") for r in records)
    return {
        "records": len(records),
        "ok": status.get("ok", 0), "oom": status.get("oom", 0),
        "error": sum(n for s, n in status.items() if s not in ("ok", "oom")),
        "models": list(dict.fromkeys(r.get("model") for r in records)),
        "variants": len({r.get("rope") for r in records}),
        "tasks": list(dict.fromkeys(r.get("task") for r in records)),
    }


def _table_html(table: Table, styles: dict[str, Style], files: dict[str, str]) -> str:
    past = [table.past(n) for n, _ in table.columns]
    best = [table.best(j) for j in range(len(table.columns))]
    head = "".join(f'<th class="{"past" if p else ""}" title="{n} tokens">{e(table.header(j))}</th>'
                   for j, ((n, _), p) in enumerate(zip(table.columns, past, strict=True)))
    rows = []
    for i, (label, rope) in enumerate(zip(table.variants, table.ropes, strict=True)):
        color = styles[label].color if label in styles else "#888"
        tds = [f'<td class="variant" title="{e(rope)}"><span class="swatch" style="background:{color}"></span>'
               f"{e(label)}</td>"]
        for j, value in enumerate(table.cells[i]):
            classes = ["past"] if past[j] else []
            if value is None:
                classes.append("missing")
            elif value.status != "ok":
                classes.append(value.status)
            if i in best[j]:
                classes.append("best")
            text = e(table.text(i, j))
            ci = interval_text(value, table.metric)
            if ci:
                text += f'<span class="ci">{e(ci)}</span>'
            tds.append(f'<td class="{" ".join(classes)}">{text}</td>')
        rows.append("<tr>" + "".join(tds) + "</tr>")
    links = " · ".join(f'<a href="{e(href)}">{e(kind)}</a>' for kind, href in files.items())
    return (f'<h3 id="t-{e(table.slug)}">{e(table.title)}</h3>\n<div class="scroll"><table class="results">'
            f'<thead><tr><th class="variant">variant</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
            f'</table></div>\n<div class="files">{links}</div>')


def _gate_html(gate: GateResult, fail_on_missing: bool, baseline: str | None) -> str:
    passed = gate.passed(fail_on_missing)
    parts = [f'<section class="gate {"pass" if passed else "fail"}" id="gate"><div class="verdict">'
             f'Regression gate {"passed" if passed else "failed"}</div>'
             f'<div class="muted">{e(gate.verdict(fail_on_missing))}'
             + (f" · baseline: {e(baseline)}" if baseline else "") + "</div>"]
    header = ["task", "metric", "model", "variant", "length", "baseline", "current", "change"]
    miss_header = ["task", "metric", "model", "variant", "length", "settings"]
    lists = [("Regressions", header, gate.rows(gate.regressions), True),
             ("Improvements", header, gate.rows(gate.improvements), False),
             ("Within noise (past the tolerance, inside the cells' 95% noise)", header, gate.rows(gate.within_noise),
              False),
             ("In the baseline, missing from the results", miss_header, gate.missing_rows(gate.missing_in_current),
              fail_on_missing),
             ("New in the results (not in the baseline)", miss_header, gate.missing_rows(gate.missing_in_baseline),
              False)]
    for title, head, rows, open_ in lists:  # long lists fold away; the ones that fail the gate start open
        if rows:
            parts.append(f'<details{" open" if open_ else ""}><summary><b>{title}</b> ({len(rows)})</summary>'
                         + plain_table(head, rows, 3) + "</details>")
    return "\n".join(parts) + "</section>"


def _analysis_html(directory: Path, analysis: dict[str, Any]) -> str:
    """An ``lctx analyze`` output: its base bounds against the model's base, and its figures (SVG inline)."""
    source, rope = analysis.get("source", {}), analysis.get("rope", {})
    theta = rope.get("theta")
    rows = [[format_length(b["length"]), f"{b['base_lower_bound']:.3g}", f"{b['base_lower_bound_stable']:.3g}",
             "–" if theta is None else ("yes" if theta >= b["base_lower_bound"] else "no")]
            for b in analysis.get("bounds", [])]
    parts = [f"<h3>{e(source.get('name', directory.name))}: base {e(theta)}, rotary dimension "
             f"{e(rope.get('rotary_dim'))}, training length {e(rope.get('train_len'))}</h3>",
             plain_table(["length", "base lower bound", "stable from", "model's base meets it"], rows, 0)]
    for figure in analysis.get("figures", []):
        svg = directory / figure.get("files", {}).get("svg", "")
        if svg.is_file():
            parts.append(f'<figure>{svg_image(svg.read_bytes(), str(figure.get("title")), 860)}'
                         f'<figcaption>{e(figure.get("caption"))}</figcaption></figure>')
    return "\n".join(parts)


def render(page: Page, table_files: dict[str, dict[str, str]]) -> str:
    """The page's HTML; ``table_files`` maps a table's slug to its files (kind -> relative path)."""
    s = stats(page.records)
    by_section = sections(page.tables)
    for plot, _ in page.plots:
        by_section.setdefault(plot.section, [])
    nav = "".join(f'<a href="#{anchor(name)}">{e(name)}</a>' for name in by_section)
    if page.trend is not None:
        nav = '<a href="#history">history</a>' + nav
    if page.gate is not None:
        nav = '<a href="#gate">gate</a>' + nav
    categories, effective = page.summaries_of("categories"), page.summaries_of("effective_length")
    correlation = page.summaries_of("correlation")
    for present, target, name in ((categories, "summaries", "summaries"),
                                  (effective, "effective-length", "effective length"),
                                  (correlation, "correlation", "perplexity ↔ tasks"),
                                  (page.analyses, "analysis", "analysis")):
        if present:
            nav += f'<a href="#{target}">{e(name)}</a>'
    body = []
    if page.gate is not None:
        body.append(_gate_html(page.gate, page.fail_on_missing, page.baseline))
    if page.trend is not None:
        body.append('<section id="history"><h2>history</h2>')
        body.append(extra.history_html(page.trend, page.trend_plots, page.out, page.gate))
        body.append("</section>")
    for name, members in by_section.items():
        body.append(f'<section id="{anchor(name)}"><h2>{e(name)}</h2>')
        figures = [(plot, files) for plot, files in page.plots if plot.section == name]
        for model in dict.fromkeys([t.group.model for t in members] + [plot.model for plot, _ in figures]):
            body += [_table_html(t, page.styles, table_files.get(t.slug, {})) for t in members
                     if t.group.model == model]
            body += [figure_html(plot, files, page.out) for plot, files in figures if plot.model == model]
        body.append("</section>")
    if categories:
        body.append('<section id="summaries"><h2>summaries</h2>')
        body += [f"<h3>{e(summary.title)}</h3>" + plain_table(summary.columns, summary.rows, 1)
                 for summary in categories]
        body.append("</section>")
    if effective:
        body.append(f'<section id="effective-length"><h2>effective length</h2><p class="note">{extra.EFFECTIVE_NOTE}'
                    "</p>")
        body += [extra.effective_html(summary) for summary in effective]
        body.append("</section>")
    if correlation:
        body.append('<section id="correlation"><h2>perplexity ↔ tasks</h2>'
                    f'<p class="note">{extra.CORRELATION_NOTE}</p>')
        body.append(extra.correlation_html(correlation, page.correlation_plots, page.out))
        body.append("</section>")
    if page.analyses:
        body.append('<section id="analysis"><h2>analysis</h2>')
        body += [_analysis_html(directory, analysis) for directory, analysis in page.analyses]
        body.append("</section>")
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    description = f'<p class="description">{e(page.description.strip())}</p>' if page.description else ""
    errors = f'<span>errors <b>{s["error"]}</b></span>' if s["error"] else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="lctx report">
<title>{e(page.title)} · lctx report</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>{e(page.title)}</h1>
{description}
<div class="stats"><span>records <b>{s["records"]}</b></span><span>ok <b>{s["ok"]}</b></span>
<span>out of memory <b>{s["oom"]}</b></span>{errors}<span>variants <b>{s["variants"]}</b></span>
<span>models: {e(", ".join(map(str, s["models"])))}</span>
<span>tasks: {e(", ".join(map(str, s["tasks"])))}</span></div>
<nav>{nav}<a href="tables.md">tables.md</a><a href="tables.tex">tables.tex</a></nav>
</header>
<main>
<p class="note">Tables: variants × context length; * marks lengths past the model's training length (shaded
columns); the best value of each column is bold (↓ lower is better, ↑ higher is better); OOM: out of memory;
ERR: error (see the records); –: not run. Percent cells show a 95% interval: Wilson from the trial counts,
else a bootstrap over the records' samples. Each variant keeps its colour in every table and figure.</p>
{chr(10).join(body)}
</main>
<footer class="muted">Generated by lctx report from {e(page.source)} · {generated}</footer>
</body>
</html>
"""


def summary_markdown(page: Page) -> str:
    """A compact Markdown summary: the gate verdict and each task's headline table (for CI job summaries)."""
    s = stats(page.records)
    parts = [f"# lctx report: {page.title}",
             f"{s['records']} records ({s['ok']} ok, {s['oom']} out of memory, {s['error']} errors) · "
             f"{s['variants']} variants · models: {', '.join(map(str, s['models']))}"]
    if page.gate is not None:
        parts.append(page.gate.to_markdown(page.fail_on_missing, limit=SUMMARY_ROWS).strip())
    if page.trend is not None:
        found = page.trend.regressions
        text = (f"## History\n\n{len(page.trend.runs)} runs ({page.trend.runs[0].when} to "
                f"{page.trend.runs[-1].when}); {len(found)} regressions between a cell's consecutive runs.")
        if found:
            rows = [[run.label, *GateResult.rows([change])[0]] for run, change in found[-SUMMARY_ROWS:]]
            text += "\n\n" + markdown_table(["run", "task", "metric", "model", "variant", "length", "before",
                                                "after", "change"], rows)
        parts.append(text)
    seen: set[int] = set()
    for table in page.tables:
        if id(table.group) in seen:  # the headline metric only: the first table of each group
            continue
        seen.add(id(table.group))
        g = table.group
        train = format_length(g.train_len) if g.train_len else "unknown"
        parts.append(f"### {g.task} · {table.metric.name} {table.arrow} · {g.model} (train {train})\n\n"
                     + table_markdown(table, interval=False))
    parts.append("\\* past the training length · **bold**: best per column · OOM: out of memory · ERR: error")
    return "\n\n".join(parts) + "\n"
