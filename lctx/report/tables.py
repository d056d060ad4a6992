"""Comparison tables: variants as rows, lengths as columns, one per (task, metric, model, settings).

Columns past the training length are marked ``*``; the best value of each column (direction-aware, ties at
the displayed precision included) is bold. Written as Markdown (sections per task), CSV (raw numbers) and
LaTeX (booktabs ``table`` floats, ready to ``\\input``).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lctx.report import cells
from lctx.report.cells import Group, Value
from lctx.results import format_length

PERCENT_METRICS = {"accuracy", "ci_low", "ci_high"}
STATUS_TEXT = {"oom": "OOM", "error": "ERR"}
MISSING = "–"


def format_number(value: float | None, metric: str) -> str:
    """A cell's number as shown: accuracies in percent, other values with 3-4 significant digits."""
    if value is None or math.isnan(value):
        return MISSING
    if metric in PERCENT_METRICS:
        return f"{100 * value:.1f}".removesuffix(".0") + "%"
    if math.isinf(value) or abs(value) >= 1e5:
        return f"{value:.2e}" if math.isfinite(value) else ("∞" if value > 0 else "−∞")
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def cell_text(value: Value | None, metric: str, interval: bool = False) -> str:
    """``OOM``/``ERR`` for failed cells, ``–`` for missing ones, else the number (with its 95% interval)."""
    if value is None:
        return MISSING
    if value.status != "ok":
        return STATUS_TEXT.get(value.status, "ERR")
    text = format_number(value.value, metric)
    if interval and value.low is not None and value.high is not None and metric in PERCENT_METRICS:
        text += f" [{100 * value.low:.0f}–{100 * value.high:.0f}]"
    return text


@dataclass
class Table:
    """One comparison table with numeric cells (``cells[row][column]``; None where no record covers it)."""

    group: Group
    metric: str
    higher_is_better: bool
    variants: list[str]  # row labels
    ropes: list[str]  # canonical spec of each row
    lengths: list[int]  # columns
    cells: list[list[Value | None]]
    slug: str = ""  # file name stem, unique within a report (set by build)

    @property
    def task(self) -> str:
        return self.group.task

    @property
    def pooled(self) -> bool:
        return self.group.has_depths

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    def past(self, length: int) -> bool:
        return self.group.train_len is not None and length > self.group.train_len

    def header(self, length: int) -> str:
        return format_length(length) + ("*" if self.past(length) else "")

    @property
    def title(self) -> str:
        g = self.group
        pooled = ", all depths pooled" if self.pooled else ""
        train = f"train_len {format_length(g.train_len)}" if g.train_len else "train_len unknown"
        return f"{g.task} · {self.metric} {self.arrow}{pooled} · {g.model} · {train} · {g.settings}"

    def best(self, column: int) -> set[int]:
        """Rows holding the column's best value (ties at the displayed precision included); none when fewer
        than two values compete or all of them tie, since then nothing stands out."""
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


def build(records: Iterable[dict[str, Any]]) -> list[Table]:
    """Every table of the records: per group (task, model, settings), one per metric the task is judged by."""
    records = list(records)
    labels = cells.variant_labels(records)
    out = []
    for group in cells.groups(records):
        ropes, lengths = group.ropes, group.lengths
        for metric in cells.table_metrics(group.task, group.metrics):
            out.append(Table(
                group=group, metric=metric, higher_is_better=cells.higher_is_better(group.task, metric),
                variants=[labels[r] for r in ropes], ropes=ropes, lengths=lengths,
                cells=[[group.value(rope, n, metric) for n in lengths] for rope in ropes],
            ))
    _unique_slugs(out)
    return out


def _unique_slugs(tables: list[Table]) -> None:
    """File name stems: task, metric and model; tables differing only in settings get numbered."""
    seen: dict[str, int] = {}
    for table in tables:
        base = slugify(f"{table.task}-{table.metric}-{model_stem(table.group.model)}")
        seen[base] = seen.get(base, 0) + 1
        table.slug = base if seen[base] == 1 else f"{base}-{seen[base]}"


# ---- Markdown ----------------------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def table_markdown(table: Table, interval: bool = True, code_labels: bool = True) -> str:
    """A GitHub-flavoured Markdown table; best values bold."""
    header = ["variant", *(table.header(n) for n in table.lengths)]
    lines = ["| " + " | ".join(header) + " |", "|:---|" + "---:|" * len(table.lengths)]
    best = [table.best(j) for j in range(len(table.lengths))]
    for i, label in enumerate(table.variants):
        row = [f"`{label}`" if code_labels else _md_escape(label)]
        for j in range(len(table.lengths)):
            text = _md_escape(table.text(i, j, interval))
            row.append(f"**{text}**" if i in best[j] else text)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def sections(tables: list[Table]) -> dict[str, list[Table]]:
    """Tables by task family (``longbench:qasper`` goes under ``longbench``), in order of appearance."""
    out: dict[str, list[Table]] = {}
    for table in tables:
        out.setdefault(cells.family(table.task), []).append(table)
    return out


def to_markdown(tables: list[Table]) -> str:
    parts = []
    for section, members in sections(tables).items():
        parts.append(f"## {section}")
        for table in members:
            parts.append(f"### {table.title}\n\n{table_markdown(table)}")
    note = ("\\* past the model's training length. **Bold**: best in its column (↓ lower is better, ↑ higher is "
            "better). OOM: out of memory. ERR: error (see the records). –: not run.")
    return "\n\n".join(parts) + "\n\n" + note + "\n" if parts else "(no records)\n"


# ---- CSV ---------------------------------------------------------------------------------------------------


def to_csv(table: Table) -> str:
    """Raw numbers (full precision), ``OOM``/``ERR`` for failed cells, empty for cells not run."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["variant", "rope", *table.lengths])
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
    if value is not None and value.finite and table.metric in PERCENT_METRICS:
        text = f"{100 * value.value:.1f}"  # the caption says the unit
    else:
        text = latex_escape(table.text(i, j))
    return rf"\textbf{{{text}}}" if best else text


def to_latex(table: Table) -> str:
    """A booktabs ``table`` float (needs ``\\usepackage{booktabs}``)."""
    g = table.group
    unit = " (\\%)" if table.metric in PERCENT_METRICS else ""
    direction = "higher" if table.higher_is_better else "lower"
    train = f"training length {format_length(g.train_len)}; columns marked * are past it" if g.train_len else \
        "training length unknown"
    pooled = ", all needle depths pooled" if table.pooled else ""
    caption = (f"{latex_escape(g.task)}: {latex_escape(table.metric)}{unit} ({direction} is better{pooled}) of "
               f"\\texttt{{{latex_escape(g.model)}}} by context length in tokens; {train}. Best per column in bold. "
               f"Settings: {latex_escape(g.settings)}.")
    columns = [latex_escape(format_length(n)) + (r"\textsuperscript{*}" if table.past(n) else "")
               for n in table.lengths]
    best = [table.best(j) for j in range(len(table.lengths))]
    lines = [
        f"% lctx report: {table.title}",
        r"\begin{table}[t]",
        r"  \centering",
        r"  \small",
        f"  \\caption{{{caption}}}",
        f"  \\label{{tab:lctx-{table.slug}}}",
        r"  \begin{tabular}{l" + "r" * len(table.lengths) + "}",
        r"    \toprule",
        "    Variant & " + " & ".join(columns) + r" \\",
        r"    \midrule",
    ]
    for i, label in enumerate(table.variants):
        row = [rf"\texttt{{{latex_escape(label)}}}"]
        row += [_latex_cell(table, i, j, i in best[j]) for j in range(len(table.lengths))]
        lines.append("    " + " & ".join(row) + r" \\")
    lines += [r"    \bottomrule", r"  \end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
