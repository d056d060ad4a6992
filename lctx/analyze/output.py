"""An analysis as tables (terminal and Markdown) and as files: ``analysis.json``, ``analysis.md``, ``figures/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lctx import patches
from lctx.analyze.core import AnalyzeError
from lctx.spec import format_length, format_value


def _base(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _check(meets: bool | None) -> str:
    return "—" if meets is None else ("yes" if meets else "no")


def _b_min(row: dict[str, Any]) -> str:
    return f"{row['b_min']:.3g} at {row['b_min_at']}" + ("" if row["admissible"] else " (< 0)")


def _compact(resolved: str) -> str:
    """A resolved spec with only the parameters that differ from the variant's defaults, floats to 4 digits."""
    spec = patches.parse(resolved)
    defaults = {p.name: p.default for p in spec.variant.all_params}
    shown = [f"{key}={format_value(float(f'{value:.4g}') if isinstance(value, float) else value)}"
             for key, value in spec.params if value != defaults[key]]
    return ":".join([spec.name, *shown])


def summary(analysis: dict[str, Any]) -> str:
    """One sentence about the configuration: base, rotary dimension, training length, critical dimension."""
    source, rope, dims = analysis["source"], analysis["rope"], analysis["dimensions"]
    about = list(dict.fromkeys([source["kind"], source["arch"]]))  # a what-if has no architecture
    about += [] if source["rope_type"] == "default" else [f"rope_type {source['rope_type']}"]
    return (f"{source['name']} ({', '.join(about)}): base θ = {rope['theta']:g}, rotary "
            f"dimension {rope['rotary_dim']} (head dimension {rope['head_dim']}), trained to "
            f"{format_length(rope['train_len'])}; {dims['rotating_pairs']} of {rope['rotary_dim'] // 2} pairs "
            f"rotate within it (critical dimension {dims['critical_dimension']})")


def tables(analysis: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table: the bound against the model, what reaches each length, variants."""
    theta = analysis["rope"]["theta"]
    bound_rows = [[format_length(b["length"]), _base(b["base_lower_bound"]), _base(b["base_lower_bound_stable"]),
                   _check(m["meets_lower_bound"]), _check(m["meets_stable_bound"]), _b_min(m), f"{b['seconds']:.1f}"]
                  for b, m in zip(analysis["bounds"], analysis["model"], strict=True)]
    reach_rows = [[format_length(r["length"]), f"{r['factor']:g}", f"{r['ntk_alpha']:g}",
                   _base(r["ntk_alpha_for_bound"]), _base(r["base_for_bound"]), ", ".join(r["specs"].values())]
                  for r in analysis["reach"]]
    variant_rows = []
    for row in [*analysis["model"], *(r for v in analysis["variants"] for r in v["at"])]:
        scale = row["attention_scaling"] ** 2 * row["logn_scale"]  # cos/sin scale both q and k
        variant_rows.append([
            row["label"], format_length(row["length"]), _compact(row["resolved"]), _base(row["effective_base"]),
            f"{row['max_position']:g}", f"{row['ood_pairs']}" + (f" (×{row['max_ood_ratio']:.3g})"
                                                                 if row["max_ood_ratio"] else ""),
            f"{_check(row['meets_lower_bound'])} / {_check(row['meets_stable_bound'])}", _b_min(row),
            f"{row['decay_at_length']:.3g}", f"{scale:.3g}",
        ])
    return [
        (f"Base lower bound (Men et al. 2024), model base {theta:g}",
         ["length", "lower bound", "stable from", "base ≥ lower", "base ≥ stable", "min B (at m)", "seconds"],
         bound_rows),
        ("Parameters that reach each length",
         ["length", "factor (PI, YaRN)", "NTK α (no OOD pair)", "NTK α (bound)", "base (bound)", "specs"],
         reach_rows),
        ("Variants at each length",
         ["variant", "length", "resolved", "effective base", "max position", "OOD pairs (max ratio)",
          "base ≥ lower / stable", "min B (at m)", "decay at length", "logit scale"], variant_rows),
    ]


def print_tables(analysis: dict[str, Any], console: Console) -> None:
    console.print(escape(summary(analysis)), highlight=False)
    for title, header, rows in tables(analysis):
        table = Table(title=title, title_justify="left")
        for column in header:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*map(escape, row))
        console.print(table)


def markdown(analysis: dict[str, Any]) -> str:
    """``analysis.md``: the summary, the tables, the figures with their captions and the conventions."""
    lines = ["# RoPE analysis", "", summary(analysis) + ".", ""]
    for title, header, rows in tables(analysis):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        lines.append("")
    for figure in analysis.get("figures", []):
        lines += [f"## {figure['title']}", "", f"![{figure['title']}]({figure['files']['png']})", "",
                  figure["caption"], ""]
    lines += ["## Conventions", ""] + [f"- **{key}**: {text}" for key, text in analysis["conventions"].items()]
    return "\n".join(lines) + "\n"


def write(analysis: dict[str, Any], out: Path, figures: bool = True) -> list[Path]:
    """Write ``analysis.json``, ``analysis.md`` and (unless ``figures`` is false) ``figures/`` under ``out``.

    The figure entries (title, caption, files relative to ``out``) are added to ``analysis``.
    """
    from lctx.analyze import figures as drawing

    try:
        out.mkdir(parents=True, exist_ok=True)
        if figures:
            analysis["figures"] = drawing.render(analysis, out / "figures")
        paths = [out / "analysis.json", out / "analysis.md"]
        paths[0].write_text(json.dumps(analysis) + "\n")  # data for tools; analysis.md is the one to read
        paths[1].write_text(markdown(analysis))
    except OSError as err:
        raise AnalyzeError(f"cannot write the analysis to {str(out)!r}: {err.strerror or err}") from None
    return paths + [out / path for figure in analysis.get("figures", []) for path in figure["files"].values()]
