"""A self-contained static ``index.html`` (tables and SVG figures inline, no network requests) and a compact
Markdown summary for CI job pages.

The page carries a Content-Security-Policy that allows inline styles and ``data:`` images only, so a browser
opening the artifact fetches nothing, even if a later edit slips in an external URL. Links to the PNG/PDF
files, tables and CSV/LaTeX files are relative, so the report directory can be moved or zipped as a whole.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lctx.spec import format_length
from lctx.view.figures import Plot, Style
from lctx.view.gate import GateResult
from lctx.view.summaries import Summary
from lctx.view.tables import Table, interval_text, sections, table_markdown

FIGURE_PX_PER_INCH = 125  # CSS pixels per inch of figure: 6.9 in (two columns of a paper) shows 860 px wide
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
"""


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


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _relative(path: Path, out: Path) -> str:
    return path.resolve().relative_to(out.resolve()).as_posix()


def _anchor(text: str) -> str:
    return "s-" + "".join(ch if ch.isalnum() else "-" for ch in text.lower())


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
    head = "".join(f'<th class="{"past" if p else ""}" title="{n} tokens">{_e(table.header(j))}</th>'
                   for j, ((n, _), p) in enumerate(zip(table.columns, past, strict=True)))
    rows = []
    for i, (label, rope) in enumerate(zip(table.variants, table.ropes, strict=True)):
        color = styles[label].color if label in styles else "#888"
        tds = [f'<td class="variant" title="{_e(rope)}"><span class="swatch" style="background:{color}"></span>'
               f"{_e(label)}</td>"]
        for j, value in enumerate(table.cells[i]):
            classes = ["past"] if past[j] else []
            if value is None:
                classes.append("missing")
            elif value.status != "ok":
                classes.append(value.status)
            if i in best[j]:
                classes.append("best")
            text = _e(table.text(i, j))
            ci = interval_text(value, table.metric)
            if ci:
                text += f'<span class="ci">{_e(ci)}</span>'
            tds.append(f'<td class="{" ".join(classes)}">{text}</td>')
        rows.append("<tr>" + "".join(tds) + "</tr>")
    links = " · ".join(f'<a href="{_e(href)}">{_e(kind)}</a>' for kind, href in files.items())
    return (f'<h3 id="t-{_e(table.slug)}">{_e(table.title)}</h3>\n<div class="scroll"><table class="results">'
            f'<thead><tr><th class="variant">variant</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
            f'</table></div>\n<div class="files">{links}</div>')


def _figure_html(plot: Plot, files: dict[str, Path], out: Path) -> str:
    svg = files["svg"].read_bytes()
    data = base64.b64encode(svg).decode("ascii")
    links = " · ".join(f'<a href="{_e(_relative(path, out))}">{fmt.upper()}</a>' for fmt, path in files.items())
    width = round(plot.figure.get_figwidth() * FIGURE_PX_PER_INCH)  # SVG scales without loss: show it large
    return (f'<figure id="f-{_e(plot.stem)}"><img src="data:image/svg+xml;base64,{data}" alt="{_e(plot.title)}" '
            f'style="width:{width}px">'
            f"<figcaption>{_e(plot.caption)} <span class=\"files\">{links}</span></figcaption></figure>")


def _gate_html(gate: GateResult, fail_on_missing: bool, baseline: str | None) -> str:
    passed = gate.passed(fail_on_missing)
    parts = [f'<section class="gate {"pass" if passed else "fail"}" id="gate"><div class="verdict">'
             f'Regression gate {"passed" if passed else "failed"}</div>'
             f'<div class="muted">{_e(gate.verdict(fail_on_missing))}'
             + (f" · baseline: {_e(baseline)}" if baseline else "") + "</div>"]
    header = ["task", "metric", "model", "variant", "length", "baseline", "current", "change"]
    miss_header = ["task", "metric", "model", "variant", "length", "settings"]
    lists = [("Regressions", header, gate.rows(gate.regressions), True),
             ("Improvements", header, gate.rows(gate.improvements), False),
             ("In the baseline, missing from the results", miss_header, gate.missing_rows(gate.missing_in_current),
              fail_on_missing),
             ("New in the results (not in the baseline)", miss_header, gate.missing_rows(gate.missing_in_baseline),
              False)]
    for title, head, rows, open_ in lists:  # long lists fold away; the ones that fail the gate start open
        if rows:
            parts.append(f'<details{" open" if open_ else ""}><summary><b>{title}</b> ({len(rows)})</summary>'
                         + _plain_table(head, rows, 3) + "</details>")
    return "\n".join(parts) + "</section>"


def _plain_table(header: list[str], rows: list[list[str]], variant_column: int) -> str:
    head = "".join(f'<th class="{"variant" if k <= variant_column else ""}">{_e(h)}</th>'
                   for k, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"variant" if k <= variant_column else ""}">{_e(c)}</td>'
                                    for k, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _analysis_html(directory: Path, analysis: dict[str, Any]) -> str:
    """An ``lctx analyze`` output: its base bounds against the model's base, and its figures (SVG inline)."""
    source, rope = analysis.get("source", {}), analysis.get("rope", {})
    theta = rope.get("theta")
    rows = [[format_length(b["length"]), f"{b['base_lower_bound']:.3g}", f"{b['base_lower_bound_stable']:.3g}",
             "–" if theta is None else ("yes" if theta >= b["base_lower_bound"] else "no")]
            for b in analysis.get("bounds", [])]
    parts = [f"<h3>{_e(source.get('name', directory.name))}: base {_e(theta)}, rotary dimension "
             f"{_e(rope.get('rotary_dim'))}, training length {_e(rope.get('train_len'))}</h3>",
             _plain_table(["length", "base lower bound", "stable from", "model's base meets it"], rows, 0)]
    for figure in analysis.get("figures", []):
        svg = directory / figure.get("files", {}).get("svg", "")
        if svg.is_file():
            data = base64.b64encode(svg.read_bytes()).decode("ascii")
            parts.append(f'<figure><img src="data:image/svg+xml;base64,{data}" alt="{_e(figure.get("title"))}" '
                         f'style="width:860px"><figcaption>{_e(figure.get("caption"))}</figcaption></figure>')
    return "\n".join(parts)


def render(page: Page, table_files: dict[str, dict[str, str]]) -> str:
    """The page's HTML; ``table_files`` maps a table's slug to its files (kind -> relative path)."""
    s = stats(page.records)
    by_section = sections(page.tables)
    for plot, _ in page.plots:
        by_section.setdefault(plot.section, [])
    nav = "".join(f'<a href="#{_anchor(name)}">{_e(name)}</a>' for name in by_section)
    if page.gate is not None:
        nav = '<a href="#gate">gate</a>' + nav
    if page.summaries:
        nav += '<a href="#summaries">summaries</a>'
    if page.analyses:
        nav += '<a href="#analysis">analysis</a>'
    body = []
    if page.gate is not None:
        body.append(_gate_html(page.gate, page.fail_on_missing, page.baseline))
    for name, members in by_section.items():
        body.append(f'<section id="{_anchor(name)}"><h2>{_e(name)}</h2>')
        figures = [(plot, files) for plot, files in page.plots if plot.section == name]
        for model in dict.fromkeys([t.group.model for t in members] + [plot.model for plot, _ in figures]):
            body += [_table_html(t, page.styles, table_files.get(t.slug, {})) for t in members
                     if t.group.model == model]
            body += [_figure_html(plot, files, page.out) for plot, files in figures if plot.model == model]
        body.append("</section>")
    if page.summaries:
        body.append('<section id="summaries"><h2>summaries</h2>')
        body += [f"<h3>{_e(summary.title)}</h3>" + _plain_table(summary.columns, summary.rows, 1)
                 for summary in page.summaries]
        body.append("</section>")
    if page.analyses:
        body.append('<section id="analysis"><h2>analysis</h2>')
        body += [_analysis_html(directory, analysis) for directory, analysis in page.analyses]
        body.append("</section>")
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    description = f'<p class="description">{_e(page.description.strip())}</p>' if page.description else ""
    errors = f'<span>errors <b>{s["error"]}</b></span>' if s["error"] else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="lctx report">
<title>{_e(page.title)} · lctx report</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>{_e(page.title)}</h1>
{description}
<div class="stats"><span>records <b>{s["records"]}</b></span><span>ok <b>{s["ok"]}</b></span>
<span>out of memory <b>{s["oom"]}</b></span>{errors}<span>variants <b>{s["variants"]}</b></span>
<span>models: {_e(", ".join(map(str, s["models"])))}</span>
<span>tasks: {_e(", ".join(map(str, s["tasks"])))}</span></div>
<nav>{nav}<a href="tables.md">tables.md</a><a href="tables.tex">tables.tex</a></nav>
</header>
<main>
<p class="note">Tables: variants × context length; * marks lengths past the model's training length (shaded
columns); the best value of each column is bold (↓ lower is better, ↑ higher is better); OOM: out of memory;
ERR: error (see the records); –: not run. Accuracy cells show a Wilson 95% interval. Each variant keeps its
colour in every table and figure.</p>
{chr(10).join(body)}
</main>
<footer class="muted">Generated by lctx report from {_e(page.source)} · {generated}</footer>
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
