"""Figures of an analysis, drawn from its JSON dict alone (so anything holding ``analysis.json`` can redraw them).

One panel per target length: wavelength per dimension pair against the training and target lengths; the
running minimum of Men et al.'s B(m) (with the model's range of B as a band); Su's long-term decay bound.
The model as trained is black, each variant keeps its family's colour (lctx's report styling).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

from lctx.spec import format_length
from lctx.view.figures import save
from lctx.view.plotting import COLUMN_WIDTH, PAGE_WIDTH, STYLE, Plot, Style, variant_styles

MODEL = Style("#000000", "o", "-")


def _styles(analysis: dict[str, Any]) -> dict[str, Style]:
    # a variant resolves to one spec per target length; its first one names its family (the style's source)
    return {"model": MODEL, **variant_styles({v["at"][0]["resolved"]: v["label"] for v in analysis["variants"]
                                              if v["at"]})}


def _panels(analysis: dict[str, Any]) -> tuple[Figure, list]:
    n = len(analysis["lengths"])
    fig = Figure(figsize=(COLUMN_WIDTH if n == 1 else PAGE_WIDTH, 2.5), layout="constrained")
    return fig, list(fig.subplots(1, n, squeeze=False, sharey=True)[0])


def _rows(analysis: dict[str, Any], index: int, kinds: tuple[str, ...] = ("frequency", "attention")) -> list[dict]:
    """The model and every variant of the given kinds at the ``index``-th length."""
    rows = [v["at"][index] for v in analysis["variants"]]
    return [analysis["model"][index]] + [row for row in rows if row["kind"] in kinds]


def _mark(ax, x: float, text: str, vertical: bool = True) -> None:
    """A dotted reference line (training or target length) with a small label at its end."""
    if vertical:
        ax.axvline(x, color="0.35", linestyle=":", linewidth=0.9, zorder=1)
        ax.text(x, 0.99, f" {text}", transform=blended_transform_factory(ax.transData, ax.transAxes),
                ha="left", va="top", fontsize=6.5, color="0.35")
    else:
        ax.axhline(x, color="0.35", linestyle=":", linewidth=0.9, zorder=1)
        ax.text(0.01, x, f"{text}", transform=blended_transform_factory(ax.transAxes, ax.transData),
                ha="left", va="bottom", fontsize=6.5, color="0.35")


def _legend(fig: Figure, labels: list[str], styles: dict[str, Style], markers: bool = True) -> None:
    handles = [Line2D([], [], color=styles[x].color, marker=styles[x].marker if markers else None,
                      linestyle=styles[x].linestyle, label=x) for x in labels]
    ncols = min(len(handles), 4 if fig.get_figwidth() > COLUMN_WIDTH else 2)
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, handlelength=2.2, columnspacing=1.2)


def wavelengths(analysis: dict[str, Any]) -> Plot:
    """Wavelength 2π/θ_i per pair for the model and each frequency variant, training and target lengths marked."""
    styles = _styles(analysis)
    fig, axes = _panels(analysis)
    train_len = analysis["rope"]["train_len"]
    pairs = analysis["dimensions"]["rotating_pairs"]
    labels: list[str] = []
    for index, (ax, length) in enumerate(zip(axes, analysis["lengths"], strict=True)):
        for row in _rows(analysis, index, ("frequency",)):
            style = styles[row["label"]]
            wave = row["dims"]["wavelength"]
            ax.plot(range(len(wave)), wave, color=style.color, marker=style.marker, linestyle=style.linestyle,
                    markevery=max(1, len(wave) // 8), zorder=4 if row["label"] == "model" else 3)
            labels += [row["label"]] if row["label"] not in labels else []
        ax.set_yscale("log", base=2)
        _mark(ax, train_len, f"train {format_length(train_len)}", vertical=False)
        if length != train_len:
            _mark(ax, length, f"target {format_length(length)}", vertical=False)
        ax.axvline(pairs - 0.5, color="0.6", linestyle="--", linewidth=0.8, zorder=1)
        ax.set_title(f"{format_length(length)} tokens")
        ax.set_xlabel("dimension pair i")
    axes[0].set_ylabel("wavelength 2π/θᵢ (tokens)")
    _legend(fig, labels, styles)
    return Plot("analysis-wavelengths", "analysis", analysis["source"]["name"], "Wavelength per dimension",
                f"Wavelength 2π/θ_i of each dimension pair (log scale) for the model and each frequency variant "
                f"resolved for the panel's length; dotted: training and target lengths; dashed: the critical "
                f"dimension ({analysis['dimensions']['critical_dimension']}: pairs left of it complete a rotation "
                f"within the training length). Attention-level variants keep the model's wavelengths.", fig)


def b_curves(analysis: dict[str, Any]) -> Plot:
    """Running minimum of B over relative positions, per configuration; the model's range of B as a band."""
    styles = _styles(analysis)
    fig, axes = _panels(analysis)
    train_len = analysis["rope"]["train_len"]
    labels: list[str] = []
    for index, (ax, length) in enumerate(zip(axes, analysis["lengths"], strict=True)):
        model = analysis["model"][index]["curves"]
        ax.fill_between(model["distance"][1:], model["b_low"][1:], model["b_high"][1:], color="0.8", linewidth=0,
                        zorder=1)
        for row in _rows(analysis, index):
            style = styles[row["label"]]
            curves = row["curves"]
            ax.plot(curves["distance"][1:], curves["b_running_min"][1:], color=style.color,
                    linestyle=style.linestyle, zorder=4 if row["label"] == "model" else 3)
            labels += [row["label"]] if row["label"] not in labels else []
        ax.axhline(0, color="0.2", linewidth=0.7, zorder=2)
        ax.set_xscale("log", base=2)
        _mark(ax, train_len, "train")
        bounds = analysis["bounds"][index]
        lower = bounds["base_lower_bound"]
        ax.set_title(f"{format_length(length)}: " + ("no admissible base" if lower is None else f"base ≥ {lower:.2g}"))
        ax.set_xlabel("relative distance m")
    axes[0].set_ylabel("min over m' ≤ m of B(m')")
    _legend(fig, labels, styles, markers=False)
    return Plot("analysis-b", "analysis", analysis["source"]["name"], "B(m): Men et al.'s base criterion",
                "Running minimum of B(m) = Σ cos(m·θ_i) over relative distances up to m, at the relative positions "
                "each variant uses (attention variants: their position map); a configuration is admissible for a "
                "length when its line stays ≥ 0 up to it. Grey band: the model's B between the plotted distances. "
                "Panel titles: the smallest admissible base for the panel's length.", fig)


def decay(analysis: dict[str, Any]) -> Plot:
    """Su's long-term decay bound against relative distance, per configuration."""
    styles = _styles(analysis)
    fig, axes = _panels(analysis)
    train_len = analysis["rope"]["train_len"]
    labels: list[str] = []
    for index, (ax, length) in enumerate(zip(axes, analysis["lengths"], strict=True)):
        for row in _rows(analysis, index):
            style = styles[row["label"]]
            curves = row["curves"]
            ax.plot(curves["distance"][1:], curves["decay"][1:], color=style.color, linestyle=style.linestyle,
                    zorder=4 if row["label"] == "model" else 3)
            labels += [row["label"]] if row["label"] not in labels else []
        ax.set_xscale("log", base=2)
        _mark(ax, train_len, "train")
        ax.set_title(f"{format_length(length)} tokens")
        ax.set_xlabel("relative distance m")
    axes[0].set_ylabel("decay bound (1/(d/2))·Σⱼ|Sⱼ|")
    _legend(fig, labels, styles, markers=False)
    return Plot("analysis-decay", "analysis", analysis["source"]["name"], "Long-term decay (RoFormer §3.4.3)",
                "Upper bound of the relative attention score against relative distance: (1/(d/2))·Σ_j |S_j|, "
                "S_j = Σ_{i<j} e^(i·m·θ_i) (Su et al. 2021), at the relative position each distance maps to.", fig)


def render(analysis: dict[str, Any], directory: Path) -> list[dict[str, Any]]:
    """Draw and save every figure under ``directory``; returns what the JSON lists about each (paths relative)."""
    out = []
    with matplotlib.rc_context(STYLE):
        for draw in (wavelengths, b_curves, decay):
            plot = draw(analysis)
            files = save(plot, directory)
            out.append({"stem": plot.stem, "title": plot.title, "caption": plot.caption,
                        "files": {fmt: f"{directory.name}/{path.name}" for fmt, path in files.items()}})
            plot.figure.clear()
    return out
