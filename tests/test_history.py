"""History: a results directory with three runs renders a trend; a regression injected in the third run is
flagged on the trend (against the previous run) and by the gate (against a baseline); the section renders in
headless Chromium without network requests."""

from __future__ import annotations

import math
from pathlib import Path

import browser
import pytest
from matplotlib import colors
from typer.testing import CliRunner

from lctx import pack, results
from lctx.cli import app
from lctx.view import gate, history

ROPES = [("none:logn=false", "none"), ("pi:factor=2:logn=false", "pi:factor=2")]
LENGTHS = (128, 256, 512)
DOCS = [1.0, 1.2, 0.9, 1.1]  # per-document mean NLL: their spread is the bootstrap's noise


def ppl(run: str, when: str, rope: str, typed: str, n: int, shift: float = 0.0) -> dict:
    docs = [{"tokens": n - 1, "nll_sum": (v + shift + (0.2 if n > 256 and typed == "none" else 0)) * (n - 1),
             "last_k_tokens": 32, "last_k_nll_sum": 32 * (v + shift)} for v in DOCS]
    nll = sum(d["nll_sum"] for d in docs) / sum(d["tokens"] for d in docs)
    last = sum(d["last_k_nll_sum"] for d in docs) / 128
    return {"schema": 2, "run_id": run, "model": "m", "rope": rope, "rope_input": typed, "task": "ppl",
            "task_spec": "ppl:samples=4", "length": n, "depth": None, "train_len": 256, "dtype": "float32",
            "attn": "sdpa", "config": {"samples": 4}, "status": "ok",
            "metrics": {"ppl": math.exp(nll), "nll": nll, "last_k_ppl": math.exp(last), "last_k_nll": last},
            "samples": docs, "finished_at": when, "lctx_version": "0.1.0"}


def passkey(run: str, when: str, rope: str, typed: str, n: int, correct: int) -> dict:
    return {"schema": 2, "run_id": run, "model": "m", "rope": rope, "rope_input": typed, "task": "passkey",
            "task_spec": "passkey:samples=10", "length": n, "depth": 0.5, "train_len": 256, "dtype": "float32",
            "attn": "sdpa", "config": {"samples": 10}, "status": "ok",
            "metrics": {"accuracy": correct / 10, "correct": correct, "trials": 10}, "finished_at": when,
            "lctx_version": "0.1.0"}


def write_run(directory: Path, index: int, inject: bool) -> None:
    run, when = f"run-{index}", f"2026-01-0{index + 1}T00:00:00.000+00:00"
    store = results.Store(directory)
    for rope, typed in ROPES:
        for n in LENGTHS:
            shift = 0.5 if inject and typed == "pi:factor=2" and n == 512 else 0.0  # +65% perplexity: injected
            store.append(ppl(run, when, rope, typed, n, shift))
            correct = 10 if typed == "pi:factor=2" else 10 - n // 128
            if inject and typed == "none" and n == 128:
                correct = 8  # 9/10 -> 8/10: one trial flips, within the Wilson noise
            if inject and typed == "pi:factor=2" and n == 256:
                correct = 2  # 10/10 -> 2/10: injected
            store.append(passkey(run, when, rope, typed, n, correct))
    results.write_json(directory / f"manifest-{run}.json", {
        "run_id": run, "started_at": when, "lctx_version": "0.1.0", "git": {"revision": f"{index}" * 40,
                                                                            "dirty": index == 2},
        "packages": {"python": "3.11.9", "torch": "2.13.0", "transformers": "5.0.0"},
        "device": {"type": "cpu", "name": "Test <CPU>"}})


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    """``three``: runs 0, 1 and 2 (a regression injected in run 2); ``main``: runs 0 and 1, packed."""
    root = tmp_path_factory.mktemp("history")
    for index in range(3):
        write_run(root / "three", index, inject=index == 2)
        if index < 2:
            write_run(root / "main", index, inject=False)
    return root / "three", pack.pack(root / "main", root / "main.tar.gz").path


INJECTED = {("run-2", "ppl", "pi:factor=2", 512), ("run-2", "passkey", "pi:factor=2", 256)}


def test_trend_flags_the_regression_injected_in_the_third_run(dirs) -> None:
    three, _ = dirs
    bundle = pack.load(three)
    trend = history.trend(bundle.records, bundle.manifests, gate.parse_tolerance("2%"))
    assert [run.run_id for run in trend.runs] == ["run-0", "run-1", "run-2"]
    assert [run.label for run in trend.runs] == ["0000000", "1111111", "2222222+"]  # revision, + when dirty
    assert len(trend.series) == 2 * 2 * len(LENGTHS)  # headline of ppl and passkey, every cell in every run
    flagged = {(run.run_id, c.key.task, c.variant, c.key.length) for run, c in trend.regressions}
    assert flagged == {(r, t, v, n) for r, t, v, n in INJECTED}  # the 9/10 -> 8/10 flip is noise
    (flip,) = [p for s in trend.series for p in s.points
               if s.key.task == "passkey" and s.label == "none" and s.key.length == 128 and p.run == 2]
    assert flip.verdict == 0
    strict = history.trend(bundle.records, bundle.manifests, gate.parse_tolerance("2%"), noise=False)
    assert ("run-2", "passkey", "none", 128) in {(r.run_id, c.key.task, c.variant, c.key.length)
                                                 for r, c in strict.regressions}
    assert history.trend([r for r in bundle.records if r["run_id"] == "run-0"], {}, gate.parse_tolerance("2%")) is None


def _red_rings(figure) -> list[tuple[str, float]]:
    """(panel title, x) of every regression ring drawn."""
    out = []
    for ax in figure.axes:
        for line in ax.lines:
            if line.get_marker() == "o" and colors.to_hex(line.get_markeredgecolor()) == history.REGRESSION_COLOR:
                out += [(ax.get_title(), float(x)) for x in line.get_xdata()]
    return out


def test_trend_figures_mark_the_flagged_points(dirs) -> None:
    three, _ = dirs
    bundle = pack.load(three)
    trend = history.trend(bundle.records, bundle.manifests, gate.parse_tolerance("2%"))
    labels = {rope: typed for rope, typed in ROPES}
    base_key = next(c.key for _, c in trend.regressions if c.key.task == "ppl")
    plots = {p.stem: p for p in history.figures(trend, labels, {base_key})}
    assert set(plots) == {"trend-ppl-m", "trend-passkey-m"}
    assert _red_rings(plots["trend-ppl-m"].figure) == [("length 0.5k", 2.0)]
    assert _red_rings(plots["trend-passkey-m"].figure) == [("length 256", 2.0)]
    squares = [ax.get_title() for ax in plots["trend-ppl-m"].figure.axes for line in ax.lines
               if line.get_marker() == "s" and colors.to_hex(line.get_markeredgecolor()) == history.BASELINE_COLOR]
    assert squares == ["length 0.5k"]  # the baseline gate's regression, on the cell's latest point
    ticks = [t.get_text() for t in plots["trend-ppl-m"].figure.axes[0].get_xticklabels() if t.get_text()]
    assert ticks == ["0000000\n01-01", "1111111\n01-02", "2222222+\n01-03"]


def test_report_gates_against_the_baseline_and_renders_the_trend(dirs, tmp_path) -> None:
    three, main = dirs
    out = tmp_path / "report"
    done = CliRunner().invoke(app, ["report", str(three), "--out", str(out), "--baseline", str(main),
                                    "--summary-md", str(tmp_path / "summary.md")], env={"COLUMNS": "200"})
    assert done.exit_code == 1, done.output  # the gate: run 2 against main's newest (run 1)
    verdict = " ".join(done.output.split())
    assert "FAILED: 3 of 18 cells regressed" in verdict and "1 changed within noise" in verdict  # ppl, last-k, passkey
    summary = (tmp_path / "summary.md").read_text()
    assert "## History\n\n3 runs (2026-01-01 00:00 to 2026-01-03 00:00); 2 regressions" in summary
    page = (out / "index.html").read_text()
    assert '<section id="history">' in page and "Test &lt;CPU&gt;" in page and "Test <CPU>" not in page
    assert {p.stem for p in (out / "figures").glob("trend-*.svg")} == {"trend-ppl-m", "trend-passkey-m"}

    chromium = browser.chromium()
    if chromium is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium)")
    probe = browser.probe(chromium, out / "index.html", tmp_path / "net.json")
    assert browser.page_requests(tmp_path / "net.json") == []
    assert "history" in probe["sections"] and probe["sections"].index("gate") < probe["sections"].index("history")
    assert probe["trend"] == [1 + 2] and probe["runs"] == [1 + 3]
    assert all(complete and natural > 100 and shown > 100 for complete, natural, shown in probe["images"])
    assert len(probe["images"]) == 2 + 2 + 1  # ppl, passkey heatmap; two trends; the perplexity ↔ passkey scatter
