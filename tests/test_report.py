"""lctx report: tables, figures, the dashboard (rendered in headless Chromium) and the regression gate."""

from __future__ import annotations

import base64
import csv
import io
import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import browser
import pytest
from PIL import Image
from typer.testing import CliRunner

from lctx import patches, results, view
from lctx.cli import app
from lctx.view import figures, frame, gate, plotting, tables

TRAIN = 256  # the tiny model's training length (tests/conftest.py)
LB = {"qasper": 31.0, "narrativeqa": 17.0, "hotpotqa": 40.0, "gov_report": 25.0}  # longbench scores (×100)


def rec(task="ppl", rope="none:logn=false", typed=None, length=1024, depth=None, status="ok", model="m",
        train_len=2048, config=None, **metrics):
    """A record in the store's schema (lctx/results.py)."""
    return {"schema": 1, "run_id": "t", "model": model, "rope": rope, "rope_input": typed or rope.split(":")[0],
            "task": task, "length": length, "depth": depth, "train_len": train_len, "dtype": "float32",
            "attn": "sdpa", "config": config or {"samples": 1}, "status": status,
            "error": None if status == "ok" else "OutOfMemoryError: CUDA out of memory", "metrics": metrics,
            "finished_at": "2026-01-01T00:00:00"}


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def store(path: Path, records: list[dict]) -> Path:
    s = results.Store(path)
    for r in records:
        s.append(r)
    return path


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """Real records: lctx eval on the tiny model, two variants, ppl at and past the training length, passkey."""
    out = tmp_path_factory.mktemp("eval")
    runner = CliRunner()
    base = ["eval", "--model", str(tiny_model_dir), "--rope", "none,pi:factor=2", "--dtype", "float32",
            "--device", "cpu", "--out", str(out)]
    done = runner.invoke(app, [*base, "--task", "ppl", "--lengths", "128,256,384", "--last-k", "64"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, [*base, "--task", "passkey", "--lengths", "192,320", "--depths", "0,1",
                               "--samples", "1", "--max-new-tokens", "4"])
    assert done.exit_code == 0, done.output
    return out


def extra_records(model: str) -> list[dict]:
    """Hand-written records in the shapes other tasks write: longbench scores, synthetic accuracy, lm-eval, OOM."""
    out = []
    for k, (rope, typed) in enumerate([("none:logn=false", "none"), ("pi:factor=2:logn=false", "pi:factor=2")]):
        for n in (128, 384):
            for task, score in LB.items():
                out.append(rec(f"longbench:{task}", rope, typed, n, model=model, train_len=TRAIN,
                               score=score + 10 * k - (5 if n > TRAIN else 0)))
            for j, task in enumerate(("niah-single", "variable-tracking")):
                value = 0.9 - 0.1 * j - (0.4 if n > TRAIN and k == 0 else 0)
                out.append(rec(f"synthetic:{task}", rope, typed, n, model=model, train_len=TRAIN, score=value,
                               accuracy=value))
            out.append({**rec("lm-eval:toytask", rope, typed, n, model=model, train_len=TRAIN, loss=2.0 + k + n / 1000),
                        "data": {"higher_is_better": {"toytask": {"loss": False}}}})
    return out


@pytest.fixture(scope="module")
def full_report(tmp_path_factory, eval_dir, tiny_model_dir):
    """One report of the real records plus the hand-written ones (written once: figures take seconds)."""
    records = view.newest(results.Store(eval_dir).read()) + extra_records(str(tiny_model_dir))
    for record in [r for r in records if r["task"] == "ppl" and r["length"] == 384]:  # both variants OOM at 1k
        records.append({**record, "length": 1024, "status": "oom", "metrics": {}, "error": "OutOfMemoryError: x"})
    out = tmp_path_factory.mktemp("report")
    written = view.write(records, out, title="tiny <report>", description="two variants\nof a tiny model",
                         source=str(eval_dir))
    return records, written


# ---- tables ------------------------------------------------------------------------------------------------


def test_tables_from_real_records_hold_the_recorded_values(eval_dir) -> None:
    records = view.newest(results.Store(eval_dir).read())
    built = {(t.task, t.metric.name): t for t in tables.build(records)}
    assert set(built) == {("ppl", "ppl"), ("ppl", "last_k_ppl"), ("passkey", "accuracy")}
    ppl = built[("ppl", "ppl")]
    assert ppl.lengths == [128, 256, 384] and ppl.variants == ["none", "pi:factor=2"]
    assert [ppl.header(j) for j in range(3)] == ["128", "256", "384*"]  # past the training length: *
    assert not ppl.higher_is_better
    for i, rope in enumerate(ppl.ropes):
        for j, n in enumerate(ppl.lengths):
            (r,) = [r for r in records if r["task"] == "ppl" and r["rope"] == rope and r["length"] == n]
            assert ppl.cells[i][j].value == r["metrics"]["ppl"]
    for j in range(len(ppl.lengths)):  # the best is the lowest perplexity of the column
        values = [ppl.cells[i][j].value for i in range(2)]
        if tables.format_number(values[0], ppl.metric) != tables.format_number(values[1], ppl.metric):
            assert ppl.best(j) == {values.index(min(values))}
    passkey = built[("passkey", "accuracy")]
    assert passkey.pooled and passkey.higher_is_better
    for i, rope in enumerate(passkey.ropes):  # depths pooled: trials summed, Wilson interval recomputed
        for j, n in enumerate(passkey.lengths):
            part = [r for r in records if r["task"] == "passkey" and r["rope"] == rope and r["length"] == n]
            assert len(part) == 2
            correct, trials = sum(r["metrics"]["correct"] for r in part), sum(r["metrics"]["trials"] for r in part)
            value = passkey.cells[i][j]
            assert value.value == correct / trials
            assert (value.low, value.high) == pytest.approx(wilson(correct, trials))


def test_best_is_direction_aware_and_ties_do_not_highlight() -> None:
    records = [rec(rope="a:x=1", typed="a", length=1024, ppl=5.0), rec(rope="b:x=1", typed="b", length=1024, ppl=4.0),
               rec(rope="a:x=1", typed="a", length=4096, ppl=9.0), rec(rope="b:x=1", typed="b", length=4096,
                                                                         status="oom"),
               rec("passkey", "a:x=1", "a", 1024, depth=0.5, accuracy=0.8, correct=4, trials=5),
               rec("passkey", "b:x=1", "b", 1024, depth=0.5, accuracy=0.4, correct=2, trials=5),
               rec("passkey", "a:x=1", "a", 4096, depth=0.5, accuracy=1.0, correct=5, trials=5),
               rec("passkey", "b:x=1", "b", 4096, depth=0.5, accuracy=1.0, correct=5, trials=5)]
    ppl, acc = tables.build(records)
    assert (ppl.metric.name, acc.metric.name) == ("ppl", "accuracy")
    assert ppl.best(0) == {1}  # lower perplexity wins
    assert ppl.best(1) == set()  # one value against an OOM: nothing to compare
    assert acc.best(0) == {0}  # higher accuracy wins
    assert acc.best(1) == set()  # a tie everywhere: no highlight
    markdown = tables.table_markdown(ppl)
    assert "| `b` | **4.000** | OOM |" in markdown and "| `a` | 5.000 | 9.000 |" in markdown
    assert "| `a` | **80% [38–96]** | 100% [57–100] |" in tables.table_markdown(acc)


def test_headline_metrics_and_directions_come_from_the_tasks() -> None:
    """Tasks declare their metrics; lm-eval records carry lm-eval's own higher_is_better; tasks lctx does not know
    are shown without a direction (never bolded, never gated) instead of a guess from the metric's name."""
    def headline(*records) -> list[tuple[str, bool | None]]:
        return [(m.name, m.higher_is_better) for m in frame.groups(list(records))[0].headline]

    assert headline(rec(ppl=3.0, nll=1.1, last_k_ppl=4.0, tokens=9)) == [("ppl", False), ("last_k_ppl", False)]
    assert headline(rec("passkey", accuracy=0.5, ci_low=0.1, correct=1, trials=2)) == [("accuracy", True)]
    assert headline(rec("longbench:qasper", score=30.0)) == [("score", True)]
    assert headline(rec("synthetic:niah-single", score=0.5, accuracy=0.5)) == [("score", True)]
    lm = {"data": {"higher_is_better": {"t": {"acc": True, "perplexity": False}}}}
    assert headline({**rec("lm-eval:t", score=0.6, acc=0.6, acc_stderr=0.1), **lm}) == [("score", True)]
    assert headline({**rec("lm-eval:t", perplexity=9.0), **lm}) == [("perplexity", False)]  # lm-eval's direction
    assert headline(rec("mystery:task", rouge_l=0.3, loss=2.0)) == [("rouge_l", None)]
    mystery = tables.build([rec("mystery:task", rope="a:x=1", loss=2.0), rec("mystery:task", rope="b:x=1", loss=3.0)])
    assert mystery[0].best(0) == set() and mystery[0].arrow == ""


def test_csv_holds_full_precision_numbers_and_statuses() -> None:
    records = [rec(rope="a:x=1", length=1024, ppl=1 / 3), rec(rope="a:x=1", length=2048, status="oom"),
               rec(rope="b:x=1", typed="b", length=1024, status="error"),
               rec(rope="b:x=1", typed="b", length=2048, ppl=float("inf"))]
    (table,) = tables.build(records)
    rows = list(csv.reader(io.StringIO(tables.to_csv(table))))
    assert rows[0] == ["variant", "rope", "1024", "2048"]
    assert rows[1][:2] == ["a", "a:x=1"] and float(rows[1][2]) == 1 / 3 and rows[1][3] == "OOM"
    assert rows[2][2] == "ERR" and float(rows[2][3]) == math.inf


def test_latex_is_a_booktabs_float_with_escapes_best_and_markers() -> None:
    records = [rec(rope="yarn:factor=4:x=1", typed="yarn:factor=4", length=n, model="org/my_model", ppl=p)
               for n, p in ((2048, 6.0), (4096, 7.5))]
    records += [rec(rope="none:logn=false", typed="none", length=n, model="org/my_model", ppl=p)
                for n, p in ((2048, 5.9), (4096, 80.0))]
    (table,) = tables.build(records)
    tex = tables.to_latex(table)
    assert tex.count(r"\begin{table}") == 1 and r"\begin{tabular}{lrr}" in tex
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1
    assert r"\texttt{org/my\_model}" in tex and r"\label{tab:lctx-ppl-ppl-my-model}" in tex
    assert r"Variant & 2k & 4k\textsuperscript{*} \\" in tex  # training length 2048: 4k is past it
    assert r"\texttt{none} & \textbf{5.900} & 80.00 \\" in tex
    assert r"\texttt{yarn:factor=4} & 6.000 & \textbf{7.500} \\" in tex
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    assert not re.search(r"(?<!\\)[_%#]", body), "unescaped special character"
    rows = [line for line in body.splitlines() if line.endswith(r"\\")]
    assert len(rows) == 3 and all(line.count("&") == 2 for line in rows)


# ---- figures -----------------------------------------------------------------------------------------------


def test_variant_styles_come_from_the_declared_families() -> None:
    typed = ["none", "ntk:factor=8", "ntk:factor=8:logn=true", "ntk:factor=4", "dynamic-ntk:factor=4", "yarn:factor=4",
             "rerope:window=64", "rerope:window=64:logn=true", "leaky-rerope:window=64", "pi:factor=2", "self-extend"]
    labels = {patches.parse(t).resolve(2048).canonical: t for t in typed}
    labels["my-variant:x=1"] = "my-variant"  # a variant this lctx does not know (old records)
    styles = plotting.variant_styles(labels)
    assert plotting.variant_styles(dict(reversed(labels.items()))) == styles  # order of appearance does not matter
    assert len({s.color for s in styles.values()}) == len(labels)  # one colour per variant
    assert styles["none"].color == "#000000" and styles["yarn:factor=4"].color == patches.FAMILIES["yarn"].color.lower()
    assert styles["dynamic-ntk:factor=4"].marker == patches.FAMILIES["ntk"].markers[2]  # its place in its family
    assert styles["leaky-rerope:window=64"].marker == patches.FAMILIES["rerope"].markers[1]
    subset = plotting.variant_styles({k: v for k, v in labels.items() if v in ("yarn:factor=4", "none", "pi:factor=2")})
    assert all(subset[x] == styles[x] for x in subset)  # another run, other variants: the same styles
    assert styles["ntk:factor=8:logn=true"].linestyle == "--" and styles["ntk:factor=8"].linestyle == "-"
    assert styles["my-variant"].color == plotting.UNKNOWN_COLOR


def test_a_new_variant_gets_its_familys_colour_without_touching_the_view() -> None:
    """A variant registered with a family (here the ntk family) is styled from it: the view needs no edit."""
    from lctx.patches import frequency

    variant = patches.Variant(name="ntk-test", description="test", reference="-", params=(frequency.FACTOR,),
                              patch=patches.REGISTRY["pi"].patch, family="ntk")
    patches.register(variant)
    try:
        labels = {"ntk-test:factor=2:logn=false": "ntk-test", "pi:factor=2:logn=false": "pi"}
        styles = plotting.variant_styles(labels)
        hue = lambda c: __import__("colorsys").rgb_to_hls(*__import__("matplotlib.colors").colors.to_rgb(c))[0]  # noqa: E731
        assert hue(styles["ntk-test"].color) == pytest.approx(hue(patches.FAMILIES["ntk"].color), abs=0.01)
        assert styles["ntk-test"].marker == patches.FAMILIES["ntk"].markers[3 % len(patches.FAMILIES["ntk"].markers)]
    finally:
        del patches.REGISTRY["ntk-test"]


def _legend_colours(figure) -> dict[str, str]:
    from matplotlib import colors
    from matplotlib.lines import Line2D

    out = {}
    for legend in figure.legends:
        for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
            colour = handle.get_color() if isinstance(handle, Line2D) else handle.get_facecolor()
            out[text.get_text()] = colors.to_hex(colour)
    return out


def test_figures_cover_every_task_with_one_colour_per_variant(full_report, tiny_model_dir) -> None:
    records, _ = full_report
    by_stem = {p.stem: p for p in figures.figures(records)}
    stem = tables.slugify(tables.model_stem(str(tiny_model_dir)))
    assert set(by_stem) == {f"ppl-ppl-{stem}", f"position-loss-ppl-{stem}", f"heatmap-passkey-{stem}",
                            f"metric-lm-eval-toytask-{stem}", f"longbench-{stem}", f"synthetic-{stem}"}
    seen: dict[str, str] = {}
    for plot in by_stem.values():
        for label, colour in _legend_colours(plot.figure).items():
            if label not in ("out of memory", "infinite"):
                assert seen.setdefault(label, colour) == colour, f"{label} changes colour in {plot.stem}"
    assert set(seen) == {"none", "pi:factor=2"} and seen["none"] != seen["pi:factor=2"]

    ppl = by_stem[f"ppl-ppl-{stem}"].figure
    whole, last = ppl.axes[:2]
    assert whole.get_yscale() == "log" and whole.get_xscale() == "log"
    assert any(list(line.get_xdata()) == [TRAIN, TRAIN] for line in whole.lines)  # the training length
    curves = {line.get_label(): line for line in whole.lines if len(line.get_xdata()) == 3}
    assert len(curves) == 2
    for line in curves.values():  # the plotted perplexities are the records'
        rope = "none:logn=false" if line.get_color() == seen["none"] else "pi:factor=2:logn=false"
        expected = [next(r["metrics"]["ppl"] for r in records if r["task"] == "ppl" and r["rope"] == rope and
                         r["length"] == n and r["status"] == "ok") for n in (128, 256, 384)]
        assert list(line.get_ydata()) == pytest.approx(expected)
    oom = [line for line in whole.lines if line.get_marker() == "x" and list(line.get_xdata()) == [1024]]
    assert len(oom) == 2  # each variant's OOM at 1024 is marked

    synthetic = by_stem[f"synthetic-{stem}"].figure
    assert [ax.get_title() for ax in synthetic.axes if ax.get_visible()] == ["niah-single", "variable-tracking"]
    vt = [ax for ax in synthetic.axes if ax.get_title() == "variable-tracking"][0]
    none_line = [line for line in vt.lines if line.get_color() == seen["none"]][0]
    assert list(none_line.get_ydata()) == pytest.approx([0.8, 0.4])

    heat = by_stem[f"heatmap-passkey-{stem}"].figure
    images = [im for ax in heat.axes for im in ax.get_images()]
    assert len(images) == 2 and {im.norm.vmin for im in images} == {0} and {im.norm.vmax for im in images} == {1}


def test_longbench_figure_shows_category_means(full_report) -> None:
    records, _ = full_report
    groups = [g for g in frame.groups(records) if g.task.startswith("longbench:")]
    labels = frame.variant_labels(records)
    figure = figures.by_category(groups, labels, plotting.variant_styles(labels),
                               ("single-doc QA", "multi-doc QA", "summarization", "few-shot", "synthetic", "code"))
    top = figure.axes[0]  # length 128, within the training length
    assert [t.get_text() for t in top.get_xticklabels()] == ["single-doc QA", "multi-doc QA", "summarization",
                                                             "overall"]
    none_bars = [p.get_height() for p in top.patches[:4]]  # the first variant's bars, in category order
    single = (LB["qasper"] + LB["narrativeqa"]) / 2
    assert none_bars == pytest.approx([single, LB["hotpotqa"], LB["gov_report"],
                                       (single + LB["hotpotqa"] + LB["gov_report"]) / 3])


def test_report_files_png_pdf_svg_tables(full_report) -> None:
    _, written = full_report
    out = written.out
    stems = {p.stem for p in written.figures}
    assert len(written.figures) == 3 * len(stems) == 21  # the tasks' figures and the perplexity ↔ task scatter
    for stem in stems:
        png = out / "figures" / f"{stem}.png"
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] >= 900  # 300 dpi
        assert (out / "figures" / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
        svg = ET.parse(out / "figures" / f"{stem}.svg").getroot()
        assert svg.tag.endswith("svg") and not svg.findall(".//{http://www.w3.org/2000/svg}text")  # text as paths
    markdown = (out / "tables.md").read_text()
    assert markdown.index("## ppl") < markdown.index("## passkey") < markdown.index("## longbench")
    assert "### lm-eval:toytask · loss ↓" in markdown and "### synthetic:variable-tracking · score ↑" in markdown
    assert "## summaries" in markdown and "LongBench by category" in markdown and "effective length" in markdown
    assert (out / "tables.tex").read_text().count(r"\begin{table}") == len(written.tables)
    for table in written.tables:
        assert (out / "tables" / f"{table.slug}.csv").is_file() and (out / "tables" / f"{table.slug}.tex").is_file()


# ---- dashboard ---------------------------------------------------------------------------------------------


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append((tag, dict(attrs)))


def test_dashboard_is_self_contained(full_report) -> None:
    _, written = full_report
    page = written.index.read_text()
    collector = _Collector()
    collector.feed(page)
    tags = collector.tags
    csp = [a["content"] for t, a in tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]
    images = [a["src"] for t, a in tags if t == "img"]
    assert len(images) == 7
    for src in images:
        prefix = "data:image/svg+xml;base64,"
        assert src.startswith(prefix)
        assert ET.fromstring(base64.b64decode(src[len(prefix):])).tag.endswith("svg")
    for tag, attrs in tags:
        for name, value in attrs.items():
            assert not re.match(r"\s*(https?:)?//", value or ""), f"external reference <{tag} {name}={value}>"
        if tag == "a" and not attrs["href"].startswith("#"):
            assert (written.out / attrs["href"]).is_file(), attrs["href"]
    assert sum(1 for t, a in tags if t == "table" and a.get("class") == "results") == len(written.tables)
    assert "tiny &lt;report&gt;" in page and "<report>" not in page  # text is escaped


@pytest.mark.skipif(browser.chromium() is None, reason="no chromium binary (Debian: apt-get install chromium)")
def test_dashboard_renders_in_headless_chromium(full_report, tmp_path) -> None:
    _, written = full_report
    chromium = browser.chromium()
    dom = browser.dump_dom(chromium, written.index, tmp_path / "net.json")
    assert "<h1>tiny &lt;report&gt;</h1>" in dom and 'id="s-longbench"' in dom and 'id="s-synthetic"' in dom
    assert dom.count('class="results"') == len(written.tables)
    assert browser.page_requests(tmp_path / "net.json") == []  # the page fetched nothing over the network
    control = tmp_path / "control.html"  # the same check sees a page that does fetch something
    control.write_text('<html><body><img src="http://example.invalid/x.png"></body></html>')
    browser.dump_dom(chromium, control, tmp_path / "control.json")
    assert browser.page_requests(tmp_path / "control.json") == ["http://example.invalid/x.png"]

    probe = browser.probe(chromium, written.index, tmp_path / "net2.json")
    assert len(probe["images"]) == 7
    for complete, natural_width, shown_width in probe["images"]:  # every SVG decoded and laid out
        assert complete and natural_width > 100 and shown_width > 100
    expected_rows = [len(t.variants) + 1 for t in written.tables]
    assert probe["tables"] == expected_rows
    assert probe["best"] == sum(len(t.best(j)) for t in written.tables for j in range(len(t.columns)))

    # effective lengths, both thresholds: a heatmap (variants × lengths) per task with a success-rate headline
    assert {"effective-length", "correlation"} <= set(probe["sections"])
    assert probe["heatTables"] == [3, 3, 3, 3]  # passkey, 2 synthetic tasks, synthetic:mean: header + 2 variants
    heat = probe["heat"]
    assert len(heat) == 2 * 2 + 3 * 2 * 2  # passkey at 2 lengths; synthetic tasks and their mean at 2 lengths
    assert len({background for _, background, *_ in heat}) > 2  # coloured by score
    marked = [(text, abs_, rel, border, shadow) for text, _, abs_, rel, border, shadow in heat if abs_ or rel]
    assert marked and all(border == "4px" for _, abs_, _, border, _ in marked if abs_)
    assert all(shadow != "none" for _, _, rel, _, shadow in marked if rel)
    # synthetic niah-single of pi:factor=2 scores 90 at both lengths: effective by both rules at the longest
    assert ("90", True, True, "4px") in [(t, a, r, b) for t, a, r, b, _ in marked]
    # PPL ↔ each task measured at ppl's lengths: 4 LongBench and 2 synthetic tasks (passkey ran at other lengths)
    assert probe["corr"] == [1 + 6]
# ---- regression gate ---------------------------------------------------------------------------------------


def _gate_records():
    baseline = [rec(length=1024, ppl=10.0), rec(length=2048, ppl=20.0), rec(length=4096, ppl=40.0),
                rec(length=8192, ppl=80.0),
                rec("passkey", length=1024, depth=0.0, accuracy=0.8, correct=4, trials=5),
                rec("passkey", length=1024, depth=1.0, accuracy=0.8, correct=4, trials=5),
                rec("passkey", length=2048, depth=0.0, accuracy=0.4, correct=2, trials=5),
                rec("longbench:qasper", length=2048, score=30.0), rec("ppl", length=16384, ppl=99.0)]
    current = [rec(length=1024, ppl=10.15),  # 1.5% worse: within 2%
               rec(length=2048, ppl=20.6),  # 3% worse: regression
               rec(length=4096, ppl=36.0),  # better
               rec(length=8192, status="oom"),  # ok -> OOM: regression
               rec("passkey", length=1024, depth=0.0, accuracy=0.6, correct=3, trials=5),
               rec("passkey", length=1024, depth=1.0, accuracy=0.8, correct=4, trials=5),  # pooled 0.8 -> 0.7
               rec("passkey", length=2048, depth=0.0, accuracy=0.6, correct=3, trials=5),  # better
               rec("longbench:qasper", length=2048, score=29.9),  # 0.3% worse: within
               rec("ppl", length=32768, ppl=150.0)]  # new cell; the 16384 baseline cell is missing
    return current, baseline


def test_gate_is_direction_aware_and_lists_missing_cells() -> None:
    current, baseline = _gate_records()
    result = gate.compare(current, baseline, gate.parse_tolerance("2%"), noise=False)  # the tolerance alone
    regressed = {(c.key.task, c.key.metric, c.key.length, c.reason) for c in result.regressions}
    assert regressed == {("ppl", "ppl", 2048, "worse"), ("ppl", "ppl", 8192, "ok → oom"),
                         ("passkey", "accuracy", 1024, "worse")}
    improved = {(c.key.task, c.key.length) for c in result.improvements}
    assert improved == {("ppl", 4096), ("passkey", 2048)}
    assert [(k.task, k.length) for k, _ in result.missing_in_current] == [("ppl", 16384)]
    assert [(k.task, k.length) for k, _ in result.missing_in_baseline] == [("ppl", 32768)]
    assert result.compared == 7 and not result.passed()
    (ppl_change,) = [c for c in result.regressions if c.key.length == 2048]
    assert ppl_change.delta() == "+0.6 (+3.0%)"
    # an absolute tolerance of 0.1 accepts the passkey drop of 0.1 but not the perplexity rises of 0.15 and 0.6
    absolute = gate.compare(current, baseline, gate.parse_tolerance("0.1"), noise=False)
    assert {(c.key.task, c.key.length) for c in absolute.regressions} == {("ppl", 1024), ("ppl", 2048), ("ppl", 8192)}
    loose = gate.compare(current, baseline, gate.parse_tolerance("50%"), noise=False)
    assert [c.reason for c in loose.regressions] == ["ok → oom"]  # a status change is never tolerated
    assert loose.passed() is False
    lenient = gate.compare([r for r in current if r["length"] != 8192], baseline, gate.parse_tolerance("50%"),
                           noise=False)
    assert lenient.passed() and not lenient.passed(fail_on_missing=True)


def _docs(values: list[float], tokens: int = 100) -> list[dict]:
    """Per-document samples of a ppl record: NLL sums for the given mean NLLs per token."""
    return [{"tokens": tokens, "nll_sum": v * tokens, "last_k_tokens": 10, "last_k_nll_sum": v * 10} for v in values]


def _ppl_with_docs(length: int, nlls: list[float]) -> dict:
    docs = _docs(nlls)
    nll = sum(d["nll_sum"] for d in docs) / sum(d["tokens"] for d in docs)
    return {**rec(length=length, ppl=math.exp(nll), nll=nll), "samples": docs}


def _naive_bootstrap_ppl(nlls: list[float]) -> tuple[float, float]:
    """The documented bootstrap, written out: 2000 resamples of the documents (seed 0), percentile interval."""
    import numpy as np

    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(nlls), size=(2000, len(nlls)))
    stats = [math.exp(sum(nlls[i] for i in row) / len(row)) for row in draws]  # equal token counts
    return tuple(np.percentile(stats, [2.5, 97.5]))


def test_gate_noise_widens_the_tolerance_to_the_changes_own_interval() -> None:
    """Wilson intervals for accuracies and bootstrap intervals over documents for perplexity set each cell's
    noise; a change within it is listed apart, never a regression; --tolerance stays the floor."""
    spread = [1.0, 1.3, 0.8, 1.1, 1.2, 0.9, 1.05, 0.95]  # per-document mean NLLs
    baseline = [rec("passkey", length=1024, depth=0.0, accuracy=0.8, correct=4, trials=5),
                rec("passkey", length=1024, depth=1.0, accuracy=0.8, correct=4, trials=5),  # 8/10
                rec("passkey", length=2048, depth=0.0, accuracy=1.0, correct=40, trials=40),
                _ppl_with_docs(1024, spread), _ppl_with_docs(2048, spread)]
    current = [rec("passkey", length=1024, depth=0.0, accuracy=0.6, correct=3, trials=5),  # 7/10: one trial flips
               rec("passkey", length=1024, depth=1.0, accuracy=0.8, correct=4, trials=5),
               rec("passkey", length=2048, depth=0.0, accuracy=0.25, correct=10, trials=40),  # a real drop
               _ppl_with_docs(1024, [v + 0.03 for v in spread]),  # +3%: past 2%, inside the documents' spread
               _ppl_with_docs(2048, [v + 0.5 for v in spread])]  # +65%
    result = gate.compare(current, baseline, gate.parse_tolerance("2%"))
    assert {(c.key.task, c.key.metric, c.key.length) for c in result.regressions} == {("passkey", "accuracy", 2048),
                                                                                       ("ppl", "ppl", 2048)}
    quiet = {(c.key.task, c.key.length): c for c in result.within_noise if c.key.metric in ("accuracy", "ppl")}
    assert set(quiet) == {("passkey", 1024), ("ppl", 1024)}
    # passkey 8/10 -> 7/10: the baseline's Wilson side below, the current's above, in quadrature
    (low8, _), (_, high7) = wilson(8, 10), wilson(7, 10)
    assert quiet[("passkey", 1024)].noise == pytest.approx(math.hypot(0.8 - low8, high7 - 0.7))
    # ppl: the baseline's bootstrap side above its value, the current's below
    base_value, cur_value = math.exp(sum(spread) / 8), math.exp(sum(spread) / 8 + 0.03)
    (_, base_high), (cur_low, _) = _naive_bootstrap_ppl(spread), _naive_bootstrap_ppl([v + 0.03 for v in spread])
    assert quiet[("ppl", 1024)].noise == pytest.approx(math.hypot(base_high - base_value, cur_value - cur_low))
    assert "within noise" in result.verdict() and "noise" in result.to_markdown()
    strict = gate.compare(current, baseline, gate.parse_tolerance("2%"), noise=False)
    assert {(c.key.task, c.key.length) for c in strict.regressions} >= {("passkey", 1024), ("ppl", 1024)}
    floor = gate.compare(current, baseline, gate.parse_tolerance("70%"))  # the tolerance is the floor
    assert {(c.key.task, c.key.length) for c in floor.regressions} == {("passkey", 2048)}  # 75% worse
    improved = gate.compare(baseline, current, gate.parse_tolerance("2%"))  # the same changes the other way
    assert {(c.key.task, c.key.length) for c in improved.improvements} == {("passkey", 2048), ("ppl", 2048)}
    assert {(c.key.task, c.key.length) for c in improved.within_noise} >= {("passkey", 1024), ("ppl", 1024)}


@pytest.mark.parametrize("text", ["abc", "-2%", "2%%", "", "1e-2"])
def test_tolerance_rejects_bad_values(text) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text)) + r".*2%.*0\.05"):
        gate.parse_tolerance(text)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch) -> None:
    """CLI output unwrapped (one table row, one message per line), whatever the terminal."""
    from lctx import cli

    monkeypatch.setattr(cli.console, "width", 200)


def test_report_cli_gate_exit_status_and_tables(tmp_path) -> None:
    current, baseline = _gate_records()
    cur, base = store(tmp_path / "cur", current), store(tmp_path / "base", baseline)
    runner = CliRunner()
    summary = tmp_path / "summary.md"
    done = runner.invoke(app, ["report", str(cur), "--out", str(tmp_path / "rep"), "--baseline", str(base),
                               "--tolerance", "2%", "--summary-md", str(summary)])
    assert done.exit_code == 1, done.output
    assert "FAILED: 2 of 7 cells regressed beyond 2% or the change's 95% noise" in done.output
    assert "2 changed within noise" in done.output  # passkey 8/10 -> 7/10 and 2/5 -> 3/5: within Wilson noise
    done = runner.invoke(app, ["report", str(cur), "--out", str(tmp_path / "rep"), "--baseline", str(base),
                               "--tolerance", "2%", "--summary-md", str(summary), "--no-noise"])
    assert done.exit_code == 1, done.output
    assert "FAILED: 3 of 7 cells regressed beyond 2%" in done.output
    assert "Regressions: 3" in done.output and "+0.6 (+3.0%)" in done.output and "ok → oom" in done.output
    assert "In the baseline, missing from the results: 1" in done.output
    gate_md = (tmp_path / "rep" / "gate.md").read_text()
    assert "### Regressions (3)" in gate_md and "### New in the results (not in the baseline) (1)" in gate_md
    text = summary.read_text()
    assert text.startswith("# lctx report: cur") and "## Regression gate ❌" in text
    assert "### ppl · ppl ↓ · m (train 2k)" in text and "[" not in text.split("### ppl · ppl")[1]  # no intervals
    assert 'class="gate fail"' in (tmp_path / "rep" / "index.html").read_text()

    done = runner.invoke(app, ["report", str(cur), "--out", str(tmp_path / "rep2"), "--baseline", str(base),
                               "--tolerance", "5%", "--no-figures", "--no-noise"])
    assert done.exit_code == 1 and "2 of 7" in done.output  # the OOM and the passkey drop remain
    fixed = [r for r in current if r["length"] != 8192 and r["task"] != "passkey"]
    done = runner.invoke(app, ["report", str(store(tmp_path / "fixed", fixed)), "--out", str(tmp_path / "rep3"),
                               "--baseline", str(base), "--tolerance", "5%", "--no-figures"])
    assert done.exit_code == 0 and "passed" in done.output
    done = runner.invoke(app, ["report", str(tmp_path / "fixed"), "--out", str(tmp_path / "rep3"),
                               "--baseline", str(base), "--tolerance", "5%", "--fail-on-missing", "--no-figures"])
    assert done.exit_code == 1 and "missing from the results" in done.output
    assert "Wrote 2 tables and 0 figure files" in done.output and not (tmp_path / "rep3" / "figures").exists()


def test_report_cli_usage_errors(tmp_path) -> None:
    runner = CliRunner()
    done = runner.invoke(app, ["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    assert done.exit_code == 2 and "nowhere" in done.output and "does not exist" in done.output
    (tmp_path / "empty").mkdir()
    done = runner.invoke(app, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    assert done.exit_code == 2 and "has no records" in done.output
    cur = store(tmp_path / "cur", [rec(ppl=1.0)])
    done = runner.invoke(app, ["report", str(cur), "--out", str(tmp_path / "r"), "--baseline", str(cur),
                               "--tolerance", "two"])
    assert done.exit_code == 2 and "invalid tolerance 'two'" in done.output
    assert not (tmp_path / "r").exists()  # nothing written for a bad command


def test_report_cli_writes_the_report(eval_dir, tiny_model_dir, tmp_path) -> None:
    done = CliRunner().invoke(app, ["report", str(eval_dir), "--out", str(tmp_path / "rep")])
    assert done.exit_code == 0, done.output
    assert "Wrote 3 tables and 9 figure files" in done.output and "index.html" in done.output
    stem = tables.slugify(tables.model_stem(str(tiny_model_dir)))
    assert (tmp_path / "rep" / "figures" / f"heatmap-passkey-{stem}.pdf").is_file()
