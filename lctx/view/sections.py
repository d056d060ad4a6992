"""The dashboard's analysis sections: effective length (heatmaps variant × length), perplexity against task
scores, and the history of runs. Static HTML, every text escaped (:mod:`lctx.view.markup`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib import colors as mcolors

from lctx.spec import format_length
from lctx.view.gate import GateResult
from lctx.view.history import HISTORY_ROWS, Trend
from lctx.view.markup import e, figure_html, plain_table
from lctx.view.plotting import RETRIEVAL_CMAP, Plot
from lctx.view.summaries import Summary, length_text

TREND_ROWS = 25  # regressions between runs listed on the page

CSS = """
table.heat td.score { text-align: center; min-width: 46px; }
table.heat td.eff-abs { border-right: 4px solid #1f2328; }
table.heat td.eff-rel { box-shadow: inset 0 -4px 0 #d63384; }
.key-abs { display: inline-block; width: 4px; height: 12px; background: #1f2328; vertical-align: -2px; }
.key-rel { display: inline-block; width: 14px; height: 4px; background: #d63384; vertical-align: 1px; }
td.regressed { color: #cf222e; font-weight: 600; }
"""


def _colour(value: float) -> tuple[str, str]:
    """Background and text colour of a heatmap cell (the retrieval heatmaps' colour map, 0 to 100%)."""
    rgba = matplotlib.colormaps[RETRIEVAL_CMAP](min(max(value, 0.0), 1.0))
    return mcolors.to_hex(rgba), "#000" if value > 0.6 else "#fff"


def heatmap(rows: list[dict[str, Any]]) -> str:
    """Variants × lengths of one task, cells coloured by score; the effective lengths marked on their cells
    (RULER's: a black bar at the right edge; the relative one: a magenta underline)."""
    lengths = sorted({n for row in rows for n in row["cells"]})
    train = rows[0]["train_len"]
    head = "".join(f'<th title="{n} tokens">{e(format_length(n))}{"*" if train and n > train else ""}</th>'
                   for n in lengths)
    body = []
    for row in rows:
        tds = [f'<td class="variant" title="{e(row["rope"])}">{e(row["rope_input"])}</td>']
        for n in lengths:
            cell = row["cells"].get(n)
            marks = [name for name, length in (("eff-abs", row["effective_length"]),
                                                 ("eff-rel", row["relative_length"])) if length == n]
            if cell is None:
                tds.append(f'<td class="score missing {" ".join(marks)}">–</td>')
                continue
            background, colour = _colour(cell[0])
            title = f"{100 * cell[0]:.1f}" + (f" [{100 * cell[1]:.0f}–{100 * cell[2]:.0f}]" if cell[1] != cell[2]
                                               else "")
            tds.append(f'<td class="score {" ".join(marks)}" style="background:{background};color:{colour}" '
                       f'title="{e(title)}">{100 * cell[0]:.0f}</td>')
        shortest = lengths[0] if lengths else None
        tds.append(f'<td>{e(length_text(row["effective_length"], row["effective_interval"], shortest))}</td>')
        tds.append(f'<td>{e(length_text(row["relative_length"], row["relative_interval"], shortest))}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    first = rows[0]
    return (f'<div class="scroll"><table class="heat"><thead><tr><th class="variant">variant</th>{head}'
            f'<th>effective (&gt; {first["threshold"]:g})</th><th>relative (≥ {100 * first["ratio"]:g}%)</th>'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def effective_html(summary: Summary) -> str:
    """One model's effective lengths: a heatmap per task (and settings), then the summary's table."""
    parts = []
    by_task: dict[tuple, list[dict[str, Any]]] = {}
    for row in summary.values:
        key = (row["task"], row["train_len"], row["dtype"], row["attn"], json.dumps(row["config"], default=str))
        by_task.setdefault(key, []).append(row)
    for (task, train_len, dtype, attn, _), rows in by_task.items():
        parts.append(f"<h4>{e(task)} <span class=\"muted\">· train_len {e(train_len)} · {e(dtype)}/{e(attn)}"
                     "</span></h4>" + heatmap(rows))
    parts.append(f"<details><summary>{e(summary.title)}</summary>"
                 + plain_table(summary.columns, summary.rows, 1) + "</details>")
    return f'<h3>{e(summary.values[0]["model"])}</h3>\n' + "\n".join(parts)


EFFECTIVE_NOTE = ("Cells: the headline score (%) by variant and context length (* past the training length; hover "
                  "for the 95% interval). <span class=\"key-abs\"></span> RULER's effective length: the longest "
                  "length whose score, and every shorter one's, is above the threshold. <span class=\"key-rel\">"
                  "</span> the relative (NoLiMa) one: … at least the ratio × the variant's own score at its shortest "
                  "length. [95%]: the rule applied to the cells' interval bounds (Wilson from counts, bootstrap over "
                  "samples).")


def correlation_html(summaries: list[Summary], plots: list[tuple[Plot, dict[str, Path]]], out: Path) -> str:
    parts = []
    for summary in summaries:
        model = summary.values[0]["model"]
        parts.append(f"<h3>{e(model)}</h3>" + plain_table(summary.columns, summary.rows, 0, "corr"))
        parts += [figure_html(plot, files, out) for plot, files in plots if plot.model == model]
    return "\n".join(parts)


CORRELATION_NOTE = ("Spearman's rank correlation between perplexity and each task's headline score over the "
                    "(variant, length) cells both measured, with a 95% bootstrap interval over those cells (seeded). "
                    "ρ &lt; 0: lower perplexity goes with higher scores. The LCEG study finds perplexity tracks "
                    "long-context scores, HELMET that it does not; this is what your model says.")


def history_html(trend: Trend, plots: list[tuple[Plot, dict[str, Path]]], out: Path,
                 baseline: GateResult | None) -> str:
    """The trend: a verdict line, the regressions between runs, the trend figures and the runs' provenance."""
    first, last = trend.runs[0], trend.runs[-1]
    found = trend.regressions
    rule = f"{trend.tolerance}" + (" or the change's noise" if trend.noise else "")
    parts = [f'<p>{len(trend.runs)} runs from {e(first.when)} to {e(last.when)}; {len(trend.series)} cells measured '
             f"in two runs or more; <b>{len(found)}</b> regression{'s' if len(found) != 1 else ''} between a cell's "
             f"consecutive runs (the gate's rule: {e(rule)})"
             + (f"; {len(baseline.regressions)} against the baseline" if baseline is not None else "") + ".</p>"]
    if found:
        header = ["run", "revision", "task", "metric", "model", "variant", "length", "before", "after", "change"]
        rows = [[run.run_id, run.label, *GateResult.rows([change])[0]] for run, change in found[-TREND_ROWS:]]
        parts.append('<details open><summary><b>Regressions between runs</b> '
                     f"({len(found)}{'; the last ' + str(TREND_ROWS) if len(found) > TREND_ROWS else ''})</summary>"
                     + plain_table(header, rows, 5, "trend-regressions") + "</details>")
    parts += [figure_html(plot, files, out) for plot, files in plots]
    header = ["run", "started (UTC)", "revision", "lctx", "python", "torch", "transformers", "device", "cells",
              "regressions"]
    rows = [[run.run_id, run.when, run.label, run.lctx_version or "?",
             *(str(run.packages.get(k) or "?") for k in ("python", "torch", "transformers")), run.device or "?",
             str(len(run.records)), str(trend.regressions_in(run))] for run in reversed(trend.runs[-HISTORY_ROWS:])]
    parts.append(f"<h3>Runs (the last {min(HISTORY_ROWS, len(trend.runs))}, newest first)</h3>"
                 + plain_table(header, rows, 2, "runs"))
    return "\n".join(parts)

