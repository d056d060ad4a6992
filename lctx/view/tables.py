"""Comparison tables: variants as rows, lengths (or length × depth) as columns, one per (task spec, metric, model,
settings), rendered as Markdown, CSV, LaTeX, rich (the console) and HTML (the dashboard) from the same cells.

Columns past the training length are marked ``*``; the best value of each column (direction-aware, ties at the
displayed precision included) is bold. Numbers are formatted once (:func:`format_number`), so every output shows
the same text for the same cell.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lctx.evals import Metric
from lctx.spec import format_length
from lctx.view import frame as frames
from lctx.view.frame import Group, Value

STATUS_TEXT = {"oom": "OOM", "error": "ERR"}
MISSING = "–"
NOTE = ("\\* past the model's training length. **Bold**: best in its column (↓ lower is better, ↑ higher is "
        "better). OOM: out of memory. ERR: error (see the records). –: not run.")


def format_number(value: float | None, metric: Metric) -> str:
    """A cell's number as shown: fractions marked percent ×100 with ``%``, others with 3–4 significant digits."""
    if value is None or math.isnan(value):
        return MISSING
    if metric.percent:
        return f"{100 * value:.1f}".removesuffix(".0") + "%"
    if math.isinf(value) or abs(value) >= 1e5:
        return f"{value:.2e}" if math.isfinite(value) else ("∞" if value > 0 else "−∞")
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def interval_text(value: Value | None, metric: Metric) -> str:
    """``[45–80]``: a percent metric's 95% interval, when the cell has one."""
    if value is None or not value.finite or value.low is None or value.high is None or not metric.percent:
        return ""
    return f"[{100 * value.low:.0f}–{100 * value.high:.0f}]"


def cell_text(value: Value | None, metric: Metric, interval: bool = False) -> str:
    """``OOM``/``ERR`` for failed cells, ``–`` for missing ones, else the number (with its 95% interval)."""
    if value is None:
        return MISSING
    if value.status != "ok":
        return STATUS_TEXT.get(value.status, "ERR")
    text = format_number(value.value, metric)
    ci = interval_text(value, metric) if interval else ""
    return f"{text} {ci}" if ci else text


@dataclass
class Table:
    """One comparison table with numeric cells (``cells[row][column]``; None where no record covers it)."""

    group: Group
    metric: Metric
    variants: list[str]  # row labels
    ropes: list[str]  # canonical spec of each row
    columns: list[tuple[int, float | None]]  # (length, depth); depth None: pooled over depths
    cells: list[list[Value | None]]
    slug: str = ""  # file name stem, unique within a report (set by build)

    @property
    def task(self) -> str:
        return self.group.task

    @property
    def lengths(self) -> list[int]:
        return list(dict.fromkeys(n for n, _ in self.columns))

    @property
    def pooled(self) -> bool:
        return self.group.has_depths and all(d is None for _, d in self.columns)

    @property
    def higher_is_better(self) -> bool | None:
        return self.metric.higher_is_better

    @property
    def arrow(self) -> str:
        return {True: "↑", False: "↓"}.get(self.higher_is_better, "")

    def past(self, length: int) -> bool:
        return self.group.train_len is not None and length > self.group.train_len

    def header(self, column: int) -> str:
        length, depth = self.columns[column]
        return format_length(length) + ("*" if self.past(length) else "") + ("" if depth is None else f" @{depth:g}")

    @property
    def title(self) -> str:
        g = self.group
        pooled = ", all depths pooled" if self.pooled else ""
        train = f"train_len {format_length(g.train_len)}" if g.train_len else "train_len unknown"
        arrow = f" {self.arrow}" if self.arrow else ""
        return f"{g.task} · {self.metric.name}{arrow}{pooled} · {g.model} · {train} · {g.settings}"

    def best(self, column: int) -> set[int]:
        """Rows holding the column's best value (ties at the displayed precision included); none when fewer
        than two values compete, when all of them tie, or when the metric has no known direction."""
        if self.higher_is_better is None:
            return set()
        finite = [(i, row[column].value) for i, row in enumerate(self.cells) if row[column] and row[column].finite]
        target = (max if self.higher_is_better else min)((v for _, v in finite), default=None)
        shown = format_number(target, self.metric)
        winners = {i for i, v in finite if format_number(v, self.metric) == shown}
        return winners if len(finite) >= 2 and len(winners) < len(finite) else set()

    def text(self, row: int, column: int, interval: bool = False) -> str:
        return cell_text(self.cells[row][column], self.metric, interval)


def model_stem(model: str) -> str:
    """A model reference's last component (``/tmp/x/tiny-llama`` -> ``tiny-llama``), for file names."""
    return model.rstrip("/").rsplit("/", 1)[-1]


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "x"


def build(records: Iterable[dict[str, Any]], metric: str | None = None, by_depth: bool = False) -> list[Table]:
    """Every table of the records: per group (task spec, model, settings), one per headline metric (or the one
    named by ``metric``); ``by_depth`` gives retrieval tasks a column per length and depth."""
    records = frames.revive(records)
    labels = frames.variant_labels(records)
    out = []
    for group in frames.groups(records):
        ropes = group.ropes
        if by_depth and group.has_depths:
            columns = [(n, d) for n in group.lengths for d in group.depths]
        else:
            columns = [(n, None) for n in group.lengths]
        chosen = [group.metric(metric)] if metric else group.headline
        for m in chosen:
            out.append(Table(group=group, metric=m, variants=[labels[r] for r in ropes], ropes=ropes, columns=columns,
                             cells=[[group.value(rope, n, m, d) for n, d in columns] for rope in ropes]))
    _unique_slugs(out)
    return out


def metric_names(records: Iterable[dict[str, Any]]) -> list[str]:
    """Scalar metrics present in the records, and the cells' seconds (for ``lctx results --metric``)."""
    df = frames.frame(frames.revive(records))
    return sorted(c for c in df.columns if c not in frames.FIXED or c == "seconds")


def _unique_slugs(tables: list[Table]) -> None:
    """File name stems: task, metric and model; tables differing only in settings get numbered."""
    seen: dict[str, int] = {}
    for table in tables:
        base = slugify(f"{table.task}-{table.metric.name}-{model_stem(table.group.model)}")
        seen[base] = seen.get(base, 0) + 1
        table.slug = base if seen[base] == 1 else f"{base}-{seen[base]}"


def sections(tables: list[Table]) -> dict[str, list[Table]]:
    """Tables by task family (``longbench:qasper`` goes under ``longbench``), in order of appearance."""
    out: dict[str, list[Table]] = {}
    for table in tables:
        out.setdefault(frames.section(table.task), []).append(table)
    return out


# ---- Markdown ----------------------------------------------------------------------------------------------


def md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def table_markdown(table: Table, interval: bool = True, code_labels: bool = True) -> str:
    """A GitHub-flavoured Markdown table; best values bold."""
    header = ["variant", *(table.header(j) for j in range(len(table.columns)))]
    lines = ["| " + " | ".join(header) + " |", "|:---|" + "---:|" * len(table.columns)]
    best = [table.best(j) for j in range(len(table.columns))]
    for i, label in enumerate(table.variants):
        row = [f"`{label}`" if code_labels else md_escape(label)]
        for j in range(len(table.columns)):
            text = md_escape(table.text(i, j, interval))
            row.append(f"**{text}**" if i in best[j] else text)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def to_markdown(tables: list[Table], summaries: Iterable[Any] = ()) -> str:
    """Every table, in sections per task family, then the summaries (category averages, effective lengths)."""
    parts = []
    for name, members in sections(tables).items():
        parts.append(f"## {name}")
        for table in members:
            parts.append(f"### {table.title}\n\n{table_markdown(table)}")
    summaries = list(summaries)
    if summaries:
        parts.append("## summaries")
        parts += [summary.markdown() for summary in summaries]
    return "\n\n".join(parts) + "\n\n" + NOTE + "\n" if parts else "(no records)\n"


# ---- CSV ---------------------------------------------------------------------------------------------------


def to_csv(table: Table) -> str:
    """Raw numbers (full precision) under token counts, ``OOM``/``ERR`` for failed cells, empty for cells not run."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["variant", "rope", *(str(n) if d is None else f"{n}@{d:g}" for n, d in table.columns)])
    for i, (label, rope) in enumerate(zip(table.variants, table.ropes, strict=True)):
        row: list[Any] = [label, rope]
        for value in table.cells[i]:
            if value is None:
                row.append("")
            elif value.status != "ok":
                row.append(STATUS_TEXT.get(value.status, "ERR"))
            else:
                row.append("" if value.value is None else repr(float(value.value)))
        writer.writerow(row)
    return buffer.getvalue()


# ---- LaTeX -------------------------------------------------------------------------------------------------

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "–": "--", "−": "$-$", "∞": r"$\infty$", "·": ","}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_cell(table: Table, i: int, j: int, best: bool) -> str:
    value = table.cells[i][j]
    if value is not None and value.finite and table.metric.percent:
        text = f"{100 * value.value:.1f}"  # the caption says the unit
    else:
        text = latex_escape(table.text(i, j))
    return rf"\textbf{{{text}}}" if best else text


def to_latex(table: Table) -> str:
    """A booktabs ``table`` float (needs ``\\usepackage{booktabs}``)."""
    g = table.group
    unit = " (\\%)" if table.metric.percent else ""
    direction = {True: "higher is better", False: "lower is better"}.get(table.higher_is_better, "direction unknown")
    train = f"training length {format_length(g.train_len)}; columns marked * are past it" if g.train_len else \
        "training length unknown"
    pooled = ", all needle depths pooled" if table.pooled else ""
    caption = (f"{latex_escape(g.task)}: {latex_escape(table.metric.name)}{unit} ({direction}{pooled}) of "
               f"\\texttt{{{latex_escape(g.model)}}} by context length in tokens; {train}. Best per column in bold. "
               f"Settings: {latex_escape(g.settings)}.")
    columns = [latex_escape(table.header(j).rstrip("*")) + (r"\textsuperscript{*}" if table.past(n) else "")
               for j, (n, _) in enumerate(table.columns)]
    best = [table.best(j) for j in range(len(table.columns))]
    lines = [
        f"% lctx report: {table.title}",
        r"\begin{table}[t]",
        r"  \centering",
        r"  \small",
        f"  \\caption{{{caption}}}",
        f"  \\label{{tab:lctx-{table.slug}}}",
        r"  \begin{tabular}{l" + "r" * len(table.columns) + "}",
        r"    \toprule",
        "    Variant & " + " & ".join(columns) + r" \\",
        r"    \midrule",
    ]
    for i, label in enumerate(table.variants):
        row = [rf"\texttt{{{latex_escape(label)}}}"]
        row += [_latex_cell(table, i, j, i in best[j]) for j in range(len(table.columns))]
        lines.append("    " + " & ".join(row) + r" \\")
    lines += [r"    \bottomrule", r"  \end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ---- console -----------------------------------------------------------------------------------------------


def to_rich(table: Table):
    """A rich Table for the console: the same texts as Markdown (intervals included), best values bold."""
    from rich.markup import escape
    from rich.table import Table as RichTable

    out = RichTable(title=escape(table.title), title_justify="left", caption="* past the training length",
                    caption_justify="left")
    out.add_column("variant", overflow="fold", style="bold")
    for j in range(len(table.columns)):
        out.add_column(table.header(j), justify="right")
    best = [table.best(j) for j in range(len(table.columns))]
    for i, label in enumerate(table.variants):
        texts = [escape(table.text(i, j, interval=True)) for j in range(len(table.columns))]
        out.add_row(escape(label), *(f"[bold]{t}[/]" if i in best[j] else t for j, t in enumerate(texts)))
    return out
