"""Records of every task family: written before task specs (schema 1) they still load, resume and report; and
``lctx results`` (the console), ``table.md`` and ``lctx report`` show the same values for them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lctx import results, view
from lctx.cli import app

ROOT = Path(__file__).resolve().parent.parent
SCHEMA1 = ROOT / "tests" / "data" / "records-schema1"
# the commands that wrote the fixture (its README), run from the repository root
COMMANDS = [
    ["--task", "ppl,passkey,niah", "--samples", "1", "--depths", "0,1", "--lengths", "256,512",
     "--max-new-tokens", "4"],
    # made with lctx's exact-length generator at seed 0, the defaults then (issue 18 made RULER's the default)
    ["--task", "synthetic:fwe,variable-tracking", "--samples", "1", "--lengths", "2048", "--max-new-tokens", "4",
     "--task-arg", "fit=exact", "--seed", "0"],
    # made with lctx's exact budget, the only one then (issue 18 made LongBench's official budget the default)
    ["--task", "longbench:hotpotqa:budget=exact", "--data-dir", "tests/data/longbench-mini", "--lengths", "512",
     "--max-new-tokens", "4"],
]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch) -> None:
    from lctx import cli

    monkeypatch.setattr(cli.console, "width", 400)


def lm_eval_records() -> list[dict]:
    """lm-eval records as the bridge writes them (with lm-eval's own higher_is_better)."""
    return [{"schema": 2, "run_id": "t", "model": "m", "rope": rope, "rope_input": rope.split(":")[0],
             "task": "lm-eval:toy", "length": 512, "depth": None, "train_len": 128, "dtype": "float32", "attn": "sdpa",
             "config": {"samples": None, "seed": 0}, "status": "ok", "metrics": {"score": score, "acc": score},
             "data": {"higher_is_better": {"toy": {"acc": True}}}, "finished_at": "2026-01-01T00:00:00"}
            for rope, score in (("none:logn=false", 0.25), ("pi:factor=2:logn=false", 0.5))]


def test_schema_1_records_load_with_todays_identity() -> None:
    raw = results.Store(SCHEMA1).read()
    assert len(raw) == 26 and {r["schema"] for r in raw} == {1}
    records = view.newest(raw)
    specs = {r["task"]: r["task_spec"] for r in records}
    assert specs["ppl"] == "ppl:samples=1:last_k=256:data=pydoc"
    assert specs["passkey"] == "passkey:samples=1:seed=0:max_new_tokens=4:chat_template=false"
    assert specs["longbench:hotpotqa"] == ("longbench:hotpotqa:data=tests/data/longbench-mini:chat_template=false:"
                                           "max_new_tokens=4:budget=exact")  # samples "all" then, unset now
    assert specs["synthetic:frequent-words"].startswith("synthetic:frequent-words:samples=1:seed=0:")
    assert ":fit=exact" in specs["synthetic:frequent-words"]  # made by lctx's exact-length generator


def test_schema_1_records_resume_nothing_is_recomputed(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "records"
    shutil.copytree(SCHEMA1, out)
    before = (out / "records.jsonl").read_bytes()
    expected = [20, 4, 2]
    for args, cells in zip(COMMANDS, expected, strict=True):
        done = CliRunner().invoke(app, ["eval", "--model", "tests/data/toy-byte-128", "--rope", "none,yarn:factor=2",
                                        *args, "--out", str(out), "--no-report"])
        assert done.exit_code == 0, done.output
        assert f"{cells} cells, {cells} already recorded" in done.output and "0 to compute" in done.output
    assert (out / "records.jsonl").read_bytes() == before  # nothing appended


def table_cells(text: str, row: str) -> dict[str, list[list[str]]]:
    """Every table of a console or Markdown rendering: title → rows of cell texts (bold markers dropped)."""
    out: dict[str, list[list[str]]] = {}
    title = None
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:].strip()
            continue
        if row == "md" and line.startswith("| `") and title:
            cells = [c.strip().strip("`").replace("**", "") for c in line.strip("|").split(" | ")]
            out.setdefault(title, []).append(cells)
        if row == "rich" and line.startswith("│") and "variant" not in line:
            cells = [c.strip() for c in line.strip("│").split("│")]
            out.setdefault("?", []).append(cells)
    return out


def test_results_table_md_and_report_show_the_same_values(tmp_path) -> None:
    out = tmp_path / "records"
    shutil.copytree(SCHEMA1, out)
    store = results.Store(out)
    for record in lm_eval_records():
        store.append(record)
    shown = CliRunner().invoke(app, ["results", str(out)])
    assert shown.exit_code == 0, shown.output
    done = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "report"), "--no-figures"])
    assert done.exit_code == 0, done.output
    markdown = (tmp_path / "report" / "tables.md").read_text()
    assert markdown == view.markdown(view.newest(store.read()))  # what every run writes as table.md

    md = table_cells(markdown, "md")
    families = {title.split(" · ")[0].split(":")[0] for title in md}
    assert families == {"ppl", "passkey", "niah", "synthetic", "longbench", "lm-eval"}
    md_rows = [row for rows in md.values() for row in rows]
    console_rows = table_cells(shown.output, "rich")["?"]
    for row in md_rows:  # every Markdown row appears, cell for cell, in the console's tables
        assert row in console_rows, row
    # and the numbers are the records': e.g. ppl at 512 for none, and lm-eval's score
    records = {(r["task"], r["rope"], r["length"]): r for r in view.newest(store.read())}
    ppl = records[("ppl", "none:logn=false", 512)]["metrics"]["ppl"]
    assert any(row[0] == "none" and row[2] == view.tables.format_number(ppl, view.frame.Metric("ppl", False))
               for row in md[next(t for t in md if t.startswith("ppl · ppl"))])
    lm_rows = md[next(t for t in md if t.startswith("lm-eval:toy · score ↑"))]
    assert lm_rows == [["none", "0.250"], ["pi", "0.500"]]  # rope_input as typed
    for summary in ("LongBench by category", "effective length"):
        assert summary in markdown and summary in shown.output
    html = (tmp_path / "report" / "index.html").read_text()
    for row in md_rows:
        for cell in row[1:]:
            assert re.sub(r" \[.*\]", "", cell) in html  # the dashboard's cells (intervals in their own span)


def test_a_record_of_every_family_states_its_spec(tmp_path) -> None:
    records = view.newest([*results.Store(SCHEMA1).read(), *lm_eval_records()])
    by_task = {r["task"]: r for r in records}
    assert json.loads(json.dumps(by_task["lm-eval:toy"]["task_spec"])) == "lm-eval:toy:seed=0"
    assert by_task["niah"]["task_spec"].startswith("niah:samples=1:seed=0:max_new_tokens=4:chat_template=false:")
