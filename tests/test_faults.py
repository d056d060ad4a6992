"""Fault injection: what a crash, a full disk, a signal, a second writer or a bad input does to a run.

The guarantees (README, Results): a finished cell is never lost or recorded twice, a run resumes from whatever
state a crash left, and every bad input or broken file is refused with one ``Error:`` line (exit status 2) naming
the thing and what to do, never a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lctx import data, engine, evals, models, patches, results, spec, view
from lctx.cli import app

ROOT = Path(__file__).resolve().parent.parent
TOY = str(ROOT / "tests" / "data" / "toy-byte-128")
CLI = [sys.executable, "-c", "from lctx.cli import app; app()"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch) -> None:
    from lctx import cli

    monkeypatch.setattr(cli.console, "width", 400)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *words: str) -> None:
    """Exit status 2, one ``Error:`` line containing ``words``, and no traceback."""
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in errors[0], (word, errors[0])


def record(length: int, text: str = "") -> dict:
    return {"schema": 2, "run_id": "r", "model": "m", "model_fingerprint": None, "rope": "none:logn=false",
            "rope_input": "none", "task": "ppl", "task_spec": "ppl:samples=1", "config": {"samples": 1},
            "length": length, "depth": None, "train_len": 64, "dtype": "float32", "attn": "sdpa", "status": "ok",
            "error": None, "metrics": {"ppl": 2.0}, "samples": [{"text": text}], "finished_at": f"t{length:06d}"}


# ---- the store --------------------------------------------------------------------------------------------


def test_a_record_cut_at_any_byte_is_the_only_one_lost_and_the_next_append_is_intact(tmp_path) -> None:
    """Every offset of the last line, including inside multi-byte characters (records hold raw UTF-8)."""
    store = results.Store(tmp_path)
    store.append(record(1, "前"))
    store.append(record(2, "ascii"))
    whole = store.path.read_bytes()
    last = (json.dumps(record(3, "长上下文 — ü"), ensure_ascii=False) + "\n").encode()
    for cut in range(len(last)):  # a crash left `cut` bytes of the third record
        store.path.write_bytes(whole + last[:cut])
        complete = cut == len(last) - 1  # everything but the newline: the record itself is whole
        read = store.read()
        assert [r["length"] for r in read] == ([1, 2, 3] if complete else [1, 2]), cut
        assert len(store.skipped.lines) == (1 if 0 < cut < len(last) - 1 else 0), cut
        assert len(results.completed(results.newest(read))) == len(read)
        nxt = record(4 if complete else 3, "长上下文 — ü")  # the resumed run computes what is missing
        with store.writing():  # as a run does: the lock first (which drops the fragment), then the record
            store.append(nxt)
        again = store.read()
        assert [r["length"] for r in again] == [1, 2, 3, 4][:len(read) + 1], cut
        assert again[-1]["samples"][0]["text"] == "长上下文 — ü" and not store.skipped, cut
    store.path.write_bytes(whole + last[:40])  # without the lock (an old writer): the record still stands alone
    store.append(record(3))
    assert [r["length"] for r in store.read()] == [1, 2, 3] and len(store.skipped.lines) == 1


def test_a_cut_record_in_a_real_run_is_computed_again_once(tmp_path) -> None:
    out = tmp_path / "out"
    args = ["eval", "--model", TOY, "--rope", "none", "--task", "ppl", "--lengths", "128,192", "--out", out,
            "--no-report"]
    assert invoke(*args).exit_code == 0
    path = out / "records.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])  # killed while writing the second record
    shown = invoke("results", out)
    assert shown.exit_code == 0 and "1 unreadable line(s) skipped" in shown.output
    resumed = invoke(*args)
    assert resumed.exit_code == 0 and "1 already recorded" in resumed.output and "1 to compute" in resumed.output
    newest = view.newest(results.Store(out).read())
    assert sorted(r["length"] for r in newest) == [128, 192]  # each cell exactly once


def _disk_full_after(calls: int, monkeypatch) -> None:
    """os.fsync fails with ENOSPC from its ``calls``-th call on (where a full disk surfaces for buffered writes)."""
    real, count = os.fsync, [0]

    def fsync(fd):
        count[0] += 1
        if count[0] >= calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


class _FullDisk:
    """A records file on a disk that fills up in the middle of a line: half the bytes land, then ENOSPC."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def __getattr__(self, name: str):
        return getattr(self.handle, name)

    def write(self, data: bytes) -> int:
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_every_record(tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    args = ["eval", "--model", TOY, "--rope", "none,yarn:factor=2,rerope:window=32", "--task", "ppl", "--lengths",
            "128", "--out", out, "--no-report"]
    real_open, appends = Path.open, [0]

    def opening(self, mode="r", *rest, **kwargs):
        handle = real_open(self, mode, *rest, **kwargs)
        if self.name == "records.jsonl" and "a" in mode:
            appends[0] += 1
            if appends[0] >= 2:  # the first record lands, the second meets a full disk mid-line
                return _FullDisk(handle)
        return handle

    monkeypatch.setattr(Path, "open", opening)
    one_line_error(invoke(*args), "No space left on device", "run the same command again to resume")
    monkeypatch.undo()
    assert len(results.Store(out).read()) == 1  # the finished cell is kept; the torn second line is skipped
    assert not list(out.glob(".*.tmp*"))  # no temporary file left behind
    resumed = invoke(*args)
    assert resumed.exit_code == 0 and "1 already recorded" in resumed.output and "2 to compute" in resumed.output
    store = results.Store(out)
    assert sorted(r["rope_input"] for r in store.read()) == ["none", "rerope:window=32", "yarn:factor=2"]
    assert not store.skipped  # the torn line was dropped by the resuming writer


def test_append_turns_an_os_error_into_one_line(tmp_path, monkeypatch) -> None:
    store = results.Store(tmp_path)
    _disk_full_after(1, monkeypatch)
    with pytest.raises(results.StoreError, match="No space left on device. The records written before are kept"):
        store.append(record(1))


def test_an_unwritable_out_is_refused_before_any_work(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(invoke("eval", "--model", TOY, "--out", blocker, "--lengths", "128"), "cannot be written")
    one_line_error(invoke("eval", "--model", TOY, "--out", blocker / "sub", "--lengths", "128"), "cannot be written")


# ---- signals and a second writer --------------------------------------------------------------------------


def _start(out: Path, *extra: str) -> subprocess.Popen:
    args = [*CLI, "eval", "--model", TOY, "--rope", "none,pi:factor=2,rerope:window=32,dynamic-ntk:factor=2",
            "--task", "ppl", "--lengths", "256,512,768,1024", "--out", str(out), "--no-report", *extra]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def _wait_for_records(out: Path, proc: subprocess.Popen, count: int = 1, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out / "records.jsonl"
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    raise AssertionError("no record appeared")


def test_sigterm_keeps_the_records_and_marks_the_manifest_interrupted(tmp_path) -> None:
    out = tmp_path / "out"
    proc = _start(out)
    _wait_for_records(out, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "Interrupted." in output and "Traceback" not in output
    (manifest,) = out.glob("manifest-*.json")
    assert json.loads(manifest.read_text())["status"] == "interrupted"
    assert all(r["status"] == "ok" for r in results.Store(out).read())


def test_sigkill_then_resume_records_every_cell_once_and_a_second_writer_is_refused(tmp_path) -> None:
    out = tmp_path / "out"
    proc = _start(out)
    _wait_for_records(out, proc)
    second = invoke("eval", "--model", TOY, "--rope", "none", "--task", "ppl", "--lengths", "256", "--out", out)
    one_line_error(second, "is being written by pid", "use another --out")
    proc.kill()
    proc.communicate(timeout=60)
    before = len(results.Store(out).read())
    assert before >= 1
    resumed = _start(out)
    output, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, output
    assert f"{before} already recorded" in output
    raw = results.Store(out).read()
    keys = [results.cell_key(r) for r in raw]
    assert len(keys) == len(set(keys)) == 16  # 4 variants × 4 lengths, each recorded exactly once


# ---- honest statuses --------------------------------------------------------------------------------------


def test_a_non_finite_loss_is_an_error_and_is_computed_again(tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    args = ["eval", "--model", TOY, "--rope", "none", "--task", "ppl", "--lengths", "128", "--out", out, "--no-report"]
    real = engine.token_nll
    monkeypatch.setattr(engine, "check_head", lambda *a, **k: None)  # past the head check, to the loss itself
    monkeypatch.setattr(engine, "token_nll", lambda *a, **k: real(*a, **k) * float("nan"))
    done = invoke(*args)
    assert done.exit_code == 1 and "non-finite nll=nan" in done.output
    (rec,) = results.Store(out).read()
    assert rec["status"] == "error" and rec["error"].startswith("NonFiniteMetric")
    assert "ERR" in invoke("results", out).output  # shown as an error, not as a missing cell
    monkeypatch.setattr(engine, "token_nll", real)
    again = invoke(*args)
    assert again.exit_code == 0 and "0 already recorded" in again.output


# ---- models, data and paths -------------------------------------------------------------------------------


def _tiny_llama_dir(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=258, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((Path(TOY) / name).read_bytes())
    return path


def test_broken_models_are_named_in_one_line(tmp_path) -> None:
    gguf = Path(models.resolve_alias("smollm2-135m"))
    cases = {}
    (tmp_path / "empty.gguf").write_bytes(b"")
    cases["empty.gguf"] = "is not a GGUF file: it has 0 bytes"
    (tmp_path / "random.gguf").write_bytes(os.urandom(4096))
    cases["random.gguf"] = "is not a GGUF file: it starts with"
    with gguf.open("rb") as handle:
        (tmp_path / "cut.gguf").write_bytes(handle.read(2**20))
    cases["cut.gguf"] = "is not a complete, readable GGUF model (1,048,576 bytes)"
    base = _tiny_llama_dir(tmp_path / "ok")
    broken = {}
    for name in ("badjson", "noweights", "cutweights", "unknowntype", "customcode", "notokenizer"):
        target = tmp_path / name
        target.mkdir()
        for file in base.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
        broken[name] = target
    (broken["badjson"] / "config.json").write_text("{not json")
    (broken["noweights"] / "model.safetensors").unlink()
    weights = (broken["cutweights"] / "model.safetensors").read_bytes()
    (broken["cutweights"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    config = json.loads((base / "config.json").read_text())
    (broken["unknowntype"] / "config.json").write_text(json.dumps({**config, "model_type": "no_such_type"}))
    (broken["customcode"] / "config.json").write_text(json.dumps(
        {**config, "model_type": "mything", "auto_map": {"AutoConfig": "c.C", "AutoModelForCausalLM": "m.M"}}))
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (broken["notokenizer"] / file).unlink()
    cases.update({"badjson": "config.json is not valid JSON", "noweights": "has a config but no weights",
                  "cutweights": "is not complete: truncated at", "unknowntype": "does not recognize",
                  "customcode": "with --trust-remote-code", "notokenizer": "tokenizer cannot be loaded"})
    for name, words in cases.items():
        where = tmp_path / name
        out = tmp_path / f"out-{name}"
        result = invoke("eval", "--model", where, "--lengths", "32", "--out", out, "--no-report")
        if name == "notokenizer":  # found when the model loads: its cells are errors, the run says why
            assert result.exit_code == 1 and words in result.output and "Traceback" not in result.output
            assert {r["status"] for r in results.Store(out).read()} == {"error"}
            continue
        one_line_error(result, words)
        assert not (out / "records.jsonl").exists()  # refused before anything was written


@pytest.mark.slow  # two GGUF conversions at once: about a minute of CPU
def test_two_processes_converting_one_gguf_share_one_copy(tmp_path, monkeypatch) -> None:
    """The loser of the conversion race waits for the winner's lock and uses its copy; no temp dir is left."""
    monkeypatch.setenv("LCTX_CACHE", str(tmp_path / "cache"))
    gguf = Path(models.resolve_alias("smollm2-135m"))
    code = ("import sys; from lctx import models; print(models.source(sys.argv[1])[0])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(gguf)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert outputs[0][0] == outputs[1][0]
    entries = sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock"))
    assert len(entries) == 1 and ".tmp" not in entries[0]


def test_bad_paths_and_files_are_named_in_one_line(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = tmp_path / "out"
    assert invoke("eval", "--model", TOY, "--lengths", "128", "--out", out, "--no-report").exit_code == 0
    one_line_error(invoke("report", out, "--out", blocker / "rep", "--no-figures"), "--out", "cannot be written")
    one_line_error(invoke("report", out, "--out", tmp_path / "rep", "--summary-md", blocker / "s.md"),
                   "--summary-md", "cannot be written")
    assert not (tmp_path / "rep").exists()  # nothing written before the check
    one_line_error(invoke("results", out, "--csv", blocker / "x.csv"), "--csv")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    one_line_error(invoke("eval", "--model", TOY, "--data", latin, "--lengths", "128", "--out", tmp_path / "o2"),
                   "latin.jsonl:1 is not UTF-8")


def test_toy_train_refuses_settings_that_cannot_train_before_training(tmp_path) -> None:
    from lctx import toy

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args, words in ((["--heads", "3"], "--heads 3 must divide --dim 256"),
                        (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
                        (["--theta", "-1"], "--theta -1 must be a RoPE base > 1"),
                        (["--context", "100000000"], "is longer than the held-out corpus"),
                        (["--out", str(blocker)], "is a file")):
        full = ["train", "--context", "16", "--out", str(tmp_path / "m"), "--steps", "1", *args]
        result = CliRunner().invoke(toy.toy_app, full)
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "m" / "config.json").exists()


def test_lm_eval_model_arguments_are_checked(tiny_model_dir) -> None:
    from lctx.evals import lm_eval_bridge as bridge

    for args, words in (({"train_len": "abc"}, "train_len=abc is not valid"),
                        ({"target_len": "-5"}, "target_len=-5 is not valid")):
        with pytest.raises(bridge.ModelArgError, match=words):
            bridge.LctxLM(str(tiny_model_dir), **args)


def test_records_name_the_data_and_model_they_were_computed_on(tmp_path) -> None:
    """A changed corpus file or retrained model makes new cells instead of reusing old numbers."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The interpreter reads each line in turn. " * 40)
    model_dir = _tiny_llama_dir(tmp_path / "model")
    out = tmp_path / "out"
    args = ["eval", "--model", model_dir, "--data", doc, "--lengths", "32", "--rope", "none", "--out", out,
            "--no-report"]
    assert invoke(*args).exit_code == 0
    doc.write_text("A different text entirely, about something else. " * 40)
    changed = invoke(*args)
    assert "0 already recorded" in changed.output  # the corpus changed: a new cell
    _tiny_llama_dir(model_dir)  # retrained into the same directory (new random weights)
    retrained = invoke(*args)
    assert "0 already recorded" in retrained.output
    prints = {r["model_fingerprint"] for r in results.Store(out).read()}
    assert len(prints) == 2 and None not in prints
    table = view.markdown(view.newest(results.Store(out).read()))
    for fingerprint in prints:  # two versions of the model's files, told apart in the tables
        assert f"{model_dir} @{fingerprint}" in table


# ---- fuzzing the grammar ----------------------------------------------------------------------------------

NAMES = [*patches.variant_names(), "ppl", "passkey", "niah", "synthetic", "longbench", "lm-eval", "niah-single",
         "factor", "window", "depths", "samples", "haystack", "logn", "alpha", "stride"]
ATOMS = st.one_of(st.sampled_from(NAMES), st.sampled_from([":", "=", ",", "[", "]", '"', "-1", "0", "4", "1e9",
                                                           "true", "nan", "inf", "2.5", " ", "k", "é"]),
                  st.text(max_size=3))
SPECS = st.lists(ATOMS, max_size=8).map("".join)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rope=SPECS, task=SPECS)
def test_any_spec_runs_or_is_refused_with_one_line(rope: str, task: str, monkeypatch) -> None:
    """Through the whole command line, before any model loads: either the specs are valid (then the missing
    model is the error) or they are refused, one line either way; never a traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("eval", "--model", "/nonexistent/model", "--rope", rope or "none", "--task", task or "ppl",
                    "--lengths", "64", "--out", "/nonexistent/out")
    one_line_error(result)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=SPECS)
def test_the_parsers_raise_only_their_own_errors(text: str, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        for parsed in patches.parse_list(text):
            parsed.resolve(4096)
    except spec.SpecError as err:
        assert str(err)
    try:
        evals.resolve(text)
    except (evals.TaskError, data.DataError) as err:
        assert str(err)
