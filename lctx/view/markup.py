"""HTML pieces shared by the dashboard's sections: escaping, plain tables, inline SVG figures, anchors.

Every text that reaches the page goes through :func:`e`; figures are inlined as ``data:`` SVG images (the
page's Content-Security-Policy allows nothing else), and links to their files are relative to the report.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from lctx.view.plotting import Plot

FIGURE_PX_PER_INCH = 125  # CSS pixels per inch of figure: 6.9 in (two columns of a paper) shows 860 px wide


def e(text: Any) -> str:
    """``text`` escaped for HTML text and attribute values."""
    return html.escape(str(text), quote=True)


def relative(path: Path, out: Path) -> str:
    return path.resolve().relative_to(out.resolve()).as_posix()


def anchor(text: str) -> str:
    return "s-" + "".join(ch if ch.isalnum() else "-" for ch in text.lower())


def plain_table(header: list[str], rows: list[list[str]], variant_column: int, classes: str = "") -> str:
    """A table of texts; the columns up to ``variant_column`` are left-aligned labels."""
    head = "".join(f'<th class="{"variant" if k <= variant_column else ""}">{e(h)}</th>'
                   for k, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"variant" if k <= variant_column else ""}">{e(c)}</td>'
                                    for k, c in enumerate(row)) + "</tr>" for row in rows)
    table_class = f' class="{e(classes)}"' if classes else ""
    return (f'<div class="scroll"><table{table_class}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            "</div>")


def svg_image(svg: bytes, alt: str, width: int) -> str:
    data = base64.b64encode(svg).decode("ascii")
    return f'<img src="data:image/svg+xml;base64,{data}" alt="{e(alt)}" style="width:{width}px">'


def figure_html(plot: Plot, files: dict[str, Path], out: Path) -> str:
    """A saved figure inline (its SVG), with its caption and links to its PNG/PDF/SVG files."""
    links = " · ".join(f'<a href="{e(relative(path, out))}">{fmt.upper()}</a>' for fmt, path in files.items())
    width = round(plot.figure.get_figwidth() * FIGURE_PX_PER_INCH)  # SVG scales without loss: show it large
    return (f'<figure id="f-{e(plot.stem)}">{svg_image(files["svg"].read_bytes(), plot.title, width)}'
            f"<figcaption>{e(plot.caption)} <span class=\"files\">{links}</span></figcaption></figure>")
