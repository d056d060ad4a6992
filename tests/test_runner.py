"""``lctx eval`` and ``lctx results`` end to end through the CLI on the tiny random Llama: records, manifest,
resume, --force, out-of-memory and error cells, Ctrl-C, shards, data errors, and the comparison table."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lctx import engine, results, view
from lctx.cli import app
from lctx.data import content_fingerprint
from lctx.evals import ppl
from lctx.meter import Meter, is_oom

TOPICS = ("assert", "attribute-access", "comparisons", "customization")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """Console output with rich's line wrapping and panel borders undone."""
    return " ".join(text.translate(str.maketrans("", "", "│╭╮╰╯─")).split())


@pytest.fixture(autouse=True)
def wide_console(monkeypatch) -> None:
    """Long paths and messages on one line each, as on a wide terminal."""
    from lctx import cli

    monkeypatch.setattr(cli.console, "width", 250)


@pytest.fixture
def docs(tmp_path) -> Path:
    """A corpus directory: one document too short for any length used here, then three long ones."""
    from pydoc_data.topics import topics

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a-short.txt").write_text("Too short to be used.")
    for name in TOPICS[1:]:
        (folder / f"{name}.txt").write_text(topics[name])
    return folder


def newest(out: Path) -> list[dict]:
    return view.newest(results.Store(out).read())


def records(out: Path) -> list[dict]:
    """Every line of every records file, in file order."""
    return [json.loads(line) for path in sorted(out.glob("records*.jsonl")) for line in path.read_text().splitlines()]


def ppl_run(model_dir: Path, out: Path, docs: Path, *extra) -> list:
    return ["eval", "--model", model_dir, "--out", out, "--data", docs, "--task", "ppl", "--lengths", "200,300",
            "--last-k", "32", *extra]


def test_eval_records_every_cell_with_its_manifest(tiny_model_dir, tmp_path, docs) -> None:
    out = tmp_path / "results"
    result = invoke("eval", "--model", tiny_model_dir, "--rope", "none,yarn:factor=2", "--task", "ppl,passkey,niah",
                    "--lengths", "200,300", "--depths", "0,1", "--samples", "2", "--max-new-tokens", "3",
                    "--data", docs, "--out", out)
    text = flat(result.output)
    assert result.exit_code == 0, result.output
    assert "lctx eval: 20 cells, 0 already recorded" in text
    assert "Done: 20 cells computed (20 ok, 0 oom, 0 error), 0 already recorded." in text
    assert f"Records: {out / 'records.jsonl'}" in text and f"Table: {out / 'table.md'}" in text
    assert "note: 1 document(s) shorter than 200 tokens skipped" in text

    rows = records(out)
    assert len(rows) == 20
    (manifest_path,) = out.glob("manifest-*.json")
    manifest = json.loads(manifest_path.read_text())
    for row in rows:
        assert row["status"] == "ok" and row["error"] is None and row["run_id"] == manifest["run_id"]
        assert row["model"] == str(tiny_model_dir) and row["train_len"] == 256
        assert row["rope"] == {"none": "none:logn=false", "yarn:factor=2": "yarn:factor=2:beta_fast=32:beta_slow=1:"
                               "attention_factor=1.0693147180559945:logn=false"}[row["rope_input"]]
        assert row["dtype"] == "float32" and row["attn"] == "sdpa" and row["memory_kind"] == "cpu_rss_growth"
        assert row["seconds"] > 0 and isinstance(row["peak_memory_bytes"], int)
        assert row["schema"] == results.SCHEMA_VERSION and row["finished_at"]
    by_task = {task: [r for r in rows if r["task"] == task] for task in ("ppl", "passkey", "niah")}
    assert [len(v) for v in by_task.values()] == [4, 8, 8]

    for row in by_task["ppl"]:
        data_id = f"{docs}@{content_fingerprint(sorted(docs.glob('*.txt')))}"  # the corpus's content is its identity
        assert row["depth"] is None and row["config"] == {"samples": 2, "stride": None, "last_k": 256, "data": data_id}
        assert row["task_spec"] == f"ppl:samples=2:last_k=256:data={data_id}"
        assert row["data"]["skipped_short"] == 1 and row["data"]["documents"] == ["attribute-access.txt",
                                                                                   "comparisons.txt"]
        assert row["shared_forward"] == [200, 300]  # both variants are length-independent: one forward each
        assert row["metrics"]["tokens"] == 2 * (row["length"] - 1)
    # the recorded number equals perplexity computed here from the saved weights with plain logits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    total = count = 0
    for name in ("attribute-access", "comparisons"):
        ids = torch.tensor(tokenizer((docs / f"{name}.txt").read_text()).input_ids[:300])
        with torch.no_grad():
            total += float(F.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:], reduction="sum"))
        count += len(ids) - 1
    (plain_300,) = [r for r in by_task["ppl"] if r["rope"].startswith("none") and r["length"] == 300]
    assert plain_300["metrics"]["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)

    for task in ("passkey", "niah"):
        cells = {}
        for row in by_task[task]:
            assert row["depth"] in (0, 1) and row["metrics"]["trials"] == 2
            assert all(t["prompt_tokens"] == row["length"] for t in row["samples"])
            prompts = [(t["value"], t["insert_at"], t["filler"]) for t in row["samples"]]
            cells.setdefault((row["length"], row["depth"]), []).append(prompts)
        assert all(len(v) == 2 and v[0] == v[1] for v in cells.values())  # every variant saw the same prompts
    assert by_task["niah"][0]["config"]["needle"] == "The special magic number is {value}."
    assert by_task["passkey"][0]["config"] == {"samples": 2, "seed": 0, "max_new_tokens": 3, "chat_template": False}

    assert manifest["status"] == "finished" and manifest["command"].startswith("lctx")
    assert manifest["lctx_version"] == "0.1.0"
    assert manifest["git"] is None or re.fullmatch(r"[0-9a-f]{40}", manifest["git"]["revision"])
    assert manifest["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert manifest["device"]["type"] == "cpu" and manifest["dtype"] == "float32" and manifest["attn"] == "sdpa"
    assert manifest["shard"] is None and manifest["tasks"][1] == "passkey:samples=2:seed=0:max_new_tokens=3:" \
        "chat_template=false"
    assert manifest["models"] == [{"model": str(tiny_model_dir), "train_len": 256}]
    assert manifest["cells"] == {"planned": 20, "skipped": 0, "ok": 20, "oom": 0, "error": 0, "interrupted": False}
    assert manifest["options"]["lengths"] == [200, 300] and manifest["options"]["task_defaults"]["depths"] == "[0,1]"
    assert (out / "report" / "index.html").is_file() and any((out / "report" / "figures").glob("*.svg"))
    table = (out / "table.md").read_text()
    assert "| `none` |" in table and "| `yarn:factor=2` |" in table and "300*" in table


def test_resume_skips_recorded_cells_and_force_recomputes(tiny_model_dir, tmp_path, docs) -> None:
    out = tmp_path / "results"
    args = ppl_run(tiny_model_dir, out, docs, "--rope", "none,dynamic-ntk:factor=2")
    assert invoke(*args).exit_code == 0
    first = records(out)
    assert len(first) == 4

    again = invoke(*args)
    assert again.exit_code == 0 and "4 already recorded" in flat(again.output) and "0 to compute" in flat(again.output)
    assert records(out) == first  # nothing appended

    path = out / "records.jsonl"
    lines = path.read_text().splitlines()
    dropped = json.loads(lines[0])  # a static-variant cell whose partner length stays recorded
    path.write_text("\n".join(lines[1:]) + "\n")
    partial = invoke(*args)
    assert "3 already recorded in" in flat(partial.output) and "1 to compute" in flat(partial.output)
    (redone,) = records(out)[3:]
    assert results.cell_key(redone) == results.cell_key(dropped) and "shared_forward" not in redone
    assert redone["metrics"]["ppl"] == pytest.approx(dropped["metrics"]["ppl"], rel=1e-5)

    forced = invoke(*args, "--force")
    assert forced.exit_code == 0 and "4 to compute" in flat(forced.output) and "(--force" in flat(forced.output)
    rows = records(out)
    assert len(rows) == 8
    latest = newest(out)
    assert len(latest) == 4 and {r["run_id"] for r in latest} == {rows[-1]["run_id"]}  # the newest record wins


def test_out_of_memory_is_recorded_and_the_run_goes_on(tiny_model_dir, tmp_path, docs, monkeypatch) -> None:
    real = engine.token_nll

    def small_memory(model, ids, chunk=engine.CHUNK, skip=0):
        if len(ids) > 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, ids, chunk, skip)

    monkeypatch.setattr(engine, "token_nll", small_memory)
    out = tmp_path / "results"
    args = ppl_run(tiny_model_dir, out, docs, "--rope", "none,dynamic-ntk:factor=2")
    result = invoke(*args)
    text = flat(result.output)
    assert result.exit_code == 0, result.output  # out of memory is an outcome, not a failure
    assert "out of memory computing ppl · none · 200,300 together; retrying one cell at a time" in text
    assert "Done: 4 cells computed (2 ok, 2 oom, 0 error)" in text
    status = {(r["rope"].split(":")[0], r["length"]): r for r in records(out)}
    assert {k: r["status"] for k, r in status.items()} == {
        ("none", 200): "ok", ("none", 300): "oom", ("dynamic-ntk", 200): "ok", ("dynamic-ntk", 300): "oom"}
    assert status[("none", 300)]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert status[("none", 300)]["metrics"] == {}
    assert "OOM" in text  # the summary table
    rerun = invoke(*args)
    assert "4 already recorded" in flat(rerun.output)  # oom is recorded: --force retries it


def test_an_error_exits_1_after_the_other_cells(tiny_model_dir, tmp_path, docs, monkeypatch) -> None:
    real = ppl.Perplexity.run

    def failing(self, ctx, spec, cells, report):
        if spec.name == "yarn":
            raise ValueError("boom [/x] at the yarn cell")
        return real(self, ctx, spec, cells, report)

    monkeypatch.setattr(ppl.Perplexity, "run", failing)
    out = tmp_path / "results"
    args = ppl_run(tiny_model_dir, out, docs, "--rope", "yarn:factor=2,none")
    result = invoke(*args)
    text = flat(result.output)
    assert result.exit_code == 1, result.output
    assert "✗ ERROR" in text and "ValueError: boom [/x] at the yarn cell" in text
    assert "Done: 4 cells computed (2 ok, 0 oom, 2 error)" in text
    rows = records(out)
    assert [(r["rope"].split(":")[0], r["status"]) for r in rows] == [
        ("yarn", "error"), ("yarn", "error"), ("none", "ok"), ("none", "ok")]  # the failing variant came first
    assert rows[0]["error"] == "ValueError: boom [/x] at the yarn cell" and "failing" in rows[0]["traceback"]

    monkeypatch.setattr(ppl.Perplexity, "run", real)
    retry = invoke(*args)
    assert retry.exit_code == 0 and "2 already recorded" in flat(retry.output)  # only the errors are redone
    assert {r["status"] for r in newest(out)} == {"ok"}


def test_ctrl_c_keeps_the_records_already_written(tiny_model_dir, tmp_path, docs, monkeypatch) -> None:
    real = ppl.Perplexity.run
    calls = []

    def interrupted(self, ctx, spec, cells, report):
        calls.append(spec.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, ctx, spec, cells, report)

    monkeypatch.setattr(ppl.Perplexity, "run", interrupted)
    out = tmp_path / "results"
    args = ppl_run(tiny_model_dir, out, docs, "--rope", "none,yarn:factor=2")
    result = invoke(*args)
    assert result.exit_code == 130
    assert "Interrupted. 2 cells were recorded before the interrupt" in flat(result.output)
    assert [(r["rope"].split(":")[0], r["length"]) for r in records(out)] == [("none", 200), ("none", 300)]
    (manifest_path,) = out.glob("manifest-*.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "interrupted" and manifest["cells"]["interrupted"] is True

    monkeypatch.setattr(ppl.Perplexity, "run", real)
    resumed = invoke(*args)
    assert resumed.exit_code == 0 and "2 already recorded" in flat(resumed.output)
    assert "2 to compute" in flat(resumed.output) and len(records(out)) == 4


def test_shards_write_their_own_files_and_together_make_the_whole_plan(tiny_model_dir, tmp_path, docs) -> None:
    args = ["--rope", "none,yarn:factor=2,dynamic-ntk:factor=2"]
    sharded, whole = tmp_path / "sharded", tmp_path / "whole"
    for index in (0, 1):
        result = invoke(*ppl_run(tiny_model_dir, sharded, docs, *args, "--shard", f"{index}/2"))
        assert result.exit_code == 0, result.output
        assert f"(shard {index}/2)" in flat(result.output) and "of 6, 0 already" in flat(result.output)
    assert invoke(*ppl_run(tiny_model_dir, whole, docs, *args)).exit_code == 0

    assert sorted(p.name for p in sharded.glob("records*")) == ["records-shard-0-of-2.jsonl",
                                                                "records-shard-1-of-2.jsonl"]
    shard_keys = [{results.cell_key(json.loads(line)) for line in
                   (sharded / f"records-shard-{i}-of-2.jsonl").read_text().splitlines()} for i in (0, 1)]
    assert all(shard_keys) and not shard_keys[0] & shard_keys[1]  # both shards worked, on different cells
    merged = {results.cell_key(r): r for r in newest(sharded)}
    unsharded = {results.cell_key(r): r for r in newest(whole)}
    assert set(merged) == shard_keys[0] | shard_keys[1] == set(unsharded) and len(merged) == 6
    for key, record in merged.items():
        assert record["metrics"]["ppl"] == pytest.approx(unsharded[key]["metrics"]["ppl"], rel=1e-6)

    after = invoke(*ppl_run(tiny_model_dir, sharded, docs, *args))  # the unsharded command sees every shard
    assert "6 already recorded" in flat(after.output) and "0 to compute" in flat(after.output)

    shown = invoke("results", sharded)
    assert shown.exit_code == 0
    assert all(name in shown.output for name in ("none", "yarn:factor=2", "dynamic-ntk:factor=2", "300*"))


def test_data_errors_name_the_longest_document(tiny_model_dir, tmp_path, docs) -> None:
    out = tmp_path / "results"
    result = invoke("eval", "--model", tiny_model_dir, "--data", docs, "--task", "ppl", "--lengths", "200,1m",
                    "--out", out)
    assert result.exit_code == 2
    assert re.search(r"no document in .* has 1048576 tokens: the longest has \d+ tokens", flat(result.output))
    assert not out.exists()  # checked before anything ran
    missing = invoke("eval", "--model", tiny_model_dir, "--data", tmp_path / "nope.txt", "--out", out)
    assert missing.exit_code == 2 and "does not exist" in flat(missing.output)


def test_dataset_offline_fails_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'pg19' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    result = invoke("eval", "--model", tiny_model_dir, "--dataset", "pg19", "--lengths", "200", "--out", tmp_path)
    assert result.exit_code == 2
    assert re.search(r"cannot load dataset 'pg19:test'.*unreachable.*use --data PATH", flat(result.output))


def test_out_of_memory_errors_are_told_apart_from_other_failures() -> None:
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory")) and is_oom(MemoryError())
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 68719476736 bytes"))
    assert not is_oom(RuntimeError("shape '[2, 3]' is invalid for input of size 7"))
    assert not is_oom(ValueError("out of memory"))  # only runtime errors carry allocator messages


def test_meter_sees_a_cells_memory_and_time() -> None:
    with Meter(torch.device("cpu")) as meter:
        block = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, every page touched
        float(block.sum())
    assert meter.peak_bytes >= 48 * 2 ** 20 and meter.seconds > 0 and meter.kind == "cpu_rss_growth"
    del block


@pytest.mark.parametrize("args, message", [
    (["--shard", "2/2"], "invalid shard '2/2': the index must be between 0 and 1"),
    (["--task", "nope"], "unknown task 'nope'. Valid tasks: "),
    (["--lengths", "1x"], "invalid length '1x'"),
    (["--rope", "bogus"], "unknown RoPE variant 'bogus'. Valid variants: "),
    (["--task", "passkey", "--depths", "1.5"], "depths=[1.5] is not valid: depths (list of float ≥ 0 and ≤ 1"),
    (["--stride", "400", "--lengths", "256"], "ppl: stride=400 must be at most each length (shortest: 256)"),
    (["--needle", "x {value}"], "no selected task has a parameter 'needle'"),
    (["--task-arg", "stirde=4"], "no selected task has a parameter 'stirde' (given as stirde=4); the selected "
                                 "tasks' parameters: data, last_k, samples, stride, text_field"),
    (["--task", "ppl:strde=4"], "ppl: unknown parameter 'strde'. Parameters: samples (int ≥ 1, default 1), stride"),
    (["--samples", "0"], "ppl: samples=0 is not valid: samples (int ≥ 1, default 1)"),
    (["--prefill-chunk", "-4"], "lctx eval: prefill_chunk=-4 is not valid: prefill_chunk (length ≥ 1, auto)"),
    (["--dtype", "fp64"], "lctx eval: dtype=fp64 is not valid: dtype (text one of auto, fp32"),
])
def test_bad_options_are_rejected_by_name(tiny_model_dir, tmp_path, args, message) -> None:
    result = invoke("eval", "--model", tiny_model_dir, "--out", tmp_path / "r", *args)
    assert result.exit_code == 2 and message in flat(result.output)


def test_results_command_tables_filters_and_errors(tiny_model_dir, tmp_path, docs) -> None:
    out = tmp_path / "results"
    assert invoke(*ppl_run(tiny_model_dir, out, docs, "--rope", "none,pi:factor=2")).exit_code == 0
    latest = {(r["rope"].split(":")[0], r["length"]): r["metrics"] for r in newest(out)}

    shown = invoke("results", out)
    text = flat(shown.output)
    assert shown.exit_code == 0 and "ppl · ppl" in text and "ppl · last_k_ppl" in text
    row = re.search(r"│ none\s*│\s*([\d.]+)\s*│\s*([\d.]+)\s*│", shown.output)
    assert row and [float(v) for v in row.groups()] == [pytest.approx(latest[("none", n)]["ppl"], abs=0.01)
                                                        for n in (200, 300)]
    nll = invoke("results", out, "--metric", "nll")
    assert nll.exit_code == 0 and "ppl · nll" in flat(nll.output)
    csv = tmp_path / "cells.csv"
    assert invoke("results", out, "--csv", csv).exit_code == 0 and len(csv.read_text().splitlines()) == 5
    bad = invoke("results", out, "--metric", "bogus")
    assert bad.exit_code == 2 and "unknown metric 'bogus'; these records have: " in flat(bad.output)
    assert "last_k_ppl" in flat(bad.output)
    assert invoke("results", out, "--task", "passkey").exit_code == 1
    gone = invoke("results", tmp_path / "missing")
    assert gone.exit_code == 2 and "does not exist" in flat(gone.output)
