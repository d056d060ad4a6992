"""lctx sweep: experiment files, their validation, a resumable run that ends with the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lctx import patches, results, runner
from lctx.cli import app
from lctx.report import sweep

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def wide_console(monkeypatch) -> None:
    from lctx import cli

    monkeypatch.setattr(cli.console, "width", 200)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_su_table_experiment_plans_its_grid() -> None:
    experiment = sweep.load(ROOT / "experiments" / "su-table.toml")
    assert experiment.name == "su-table" and "ReRoPE" in experiment.description
    assert experiment.options == {"samples": 4, "last_k": 64}
    options = experiment.eval_options(Path("results") / experiment.name)
    assert (options.samples, options.last_k, options.lengths) == (4, 64, [128, 512, 1024])
    plan = runner.plan(options)
    assert plan.total_cells == 6 * 3 and plan.train_lens == {"tests/data/toy-byte-128": 128}
    ropes = {unit.spec.canonical for unit in plan.units}
    assert "rerope:window=64:logn=true" in ropes and "ntk:alpha=8:logn=true" in ropes
    assert {unit.config["last_k"] for unit in plan.units} == {64}


def test_smollm2_experiment_compares_variants_past_the_training_length() -> None:
    experiment = sweep.load(ROOT / "experiments" / "smollm2-variants.toml")
    assert experiment.models == ["smollm2-135m"] and experiment.name == "smollm2-variants"
    assert max(experiment.lengths) > 8192 >= min(experiment.lengths)
    assert len(experiment.ropes) >= 5 and "none" in experiment.ropes
    for spec in patches.parse_list(experiment.ropes):  # every variant resolves against an 8192 training length
        spec.resolve(8192, None)
    options = experiment.eval_options(Path("out"))
    assert options.depths == [0.0, 0.25, 0.5, 0.75, 1.0] and options.samples == 4


def test_sweep_runs_resumes_and_reports_its_own_cells(tiny_model_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "exp.toml", f'''
name = "tiny-sweep"
description = "two variants of a tiny model"
models = ["{tiny_model_dir}"]
ropes = ["none", "pi:factor=2"]
tasks = ["ppl"]
lengths = [128, "0.375k"]

[options]
samples = 1
last_k = 32
dtype = "float32"
device = "cpu"
''')
    invoke = CliRunner().invoke
    done = invoke(app, ["sweep", "exp.toml"])
    assert done.exit_code == 0, done.output
    records_dir, report_dir = tmp_path / "results" / "tiny-sweep", tmp_path / "report" / "tiny-sweep"  # defaults
    records = results.Store(records_dir).records()
    assert sorted((r["rope_input"], r["length"], r["status"]) for r in records) == [
        ("none", 128, "ok"), ("none", 384, "ok"), ("pi:factor=2", 128, "ok"), ("pi:factor=2", 384, "ok")]
    assert {r["config"]["last_k"] for r in records} == {32}
    manifest = json.loads(next(records_dir.glob("manifest-*.json")).read_text())
    assert manifest["status"] == "finished" and manifest["options"]["samples"] == 1
    index = (report_dir / "index.html").read_text()
    assert "two variants of a tiny model" in index and "<h1>tiny-sweep</h1>" in index
    assert (report_dir / "figures" / f"ppl-ppl-{Path(tiny_model_dir).name}.png").is_file()
    table = (report_dir / "tables.md").read_text()
    assert "| `none` |" in table and "| `pi:factor=2` |" in table and "384*" in table

    # another run's record in the same directory stays out of the experiment's report
    results.Store(records_dir).append({**records[0], "rope": "yarn:factor=9", "rope_input": "yarn:factor=9"})
    lines = sum(1 for _ in (records_dir / "records.jsonl").open())
    done = invoke(app, ["sweep", "exp.toml", "--report", "rep"])
    assert done.exit_code == 0, done.output
    assert "4 already recorded" in done.output and "0 to compute" in done.output
    assert sum(1 for _ in (records_dir / "records.jsonl").open()) == lines  # nothing recomputed
    assert (tmp_path / "rep" / "tables.md").read_text().count("| `") == 2 * 2  # ppl and last_k_ppl tables
    assert "yarn:factor=9" not in (tmp_path / "rep" / "tables.md").read_text()


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(sweep.ExperimentError) as err:
        sweep.load(write(tmp_path / "bad.toml", text))
    return str(err.value)


GRID = 'models = ["m"]\nropes = ["none"]\ntasks = ["ppl"]\nlengths = [1024]\n'


def test_experiment_errors_name_the_key_and_the_valid_choices(tmp_path) -> None:
    message = _error(tmp_path, GRID + "lenghts = [1]\n")
    assert "unknown key(s) 'lenghts'" in message and "name, description, models, ropes, tasks, lengths, options" \
        in message
    message = _error(tmp_path, GRID + "[options]\nsample = 3\n")
    assert "unknown option 'sample'" in message and "samples" in message and "last_k" in message
    assert ", ".join(sweep.option_names()) in message
    assert "lctx sweep --force" in _error(tmp_path, GRID + "[options]\nforce = true\n")
    assert "samples = 'four': expected an integer" in _error(tmp_path, GRID + '[options]\nsamples = "four"\n')
    assert "chat_template = 1: expected true or false" in _error(tmp_path, GRID + "[options]\nchat_template = 1\n")
    assert "invalid depth '2'" in _error(tmp_path, GRID + "[options]\ndepths = [0, 2]\n")
    assert "missing ropes" in _error(tmp_path, 'models = ["m"]\ntasks = ["ppl"]\nlengths = [1]\n')
    assert "invalid length '4q'" in _error(tmp_path, GRID.replace("[1024]", '["4q"]'))
    assert "ropes must be a non-empty list of strings" in _error(tmp_path, GRID.replace('["none"]', "[]"))
    assert "name 'a b'" in _error(tmp_path, 'name = "a b"\n' + GRID)
    assert "not a valid TOML file" in _error(tmp_path, GRID + "[options\n")
    with pytest.raises(sweep.ExperimentError, match="does not exist"):
        sweep.load(tmp_path / "missing.toml")


def test_options_table_maps_onto_eval_options(tmp_path) -> None:
    experiment = sweep.load(write(tmp_path / "e.toml", GRID + '''
[options]
depths = "0,0.5"
target_len = "16k"
train_len = 2048
stride = 256
task_args = { threshold = 85.6, strict = true, name = "x" }
data_dir = "data/longbench"
chat_template = true
max_new_tokens = 8
needle = "The key is {value}."
'''))
    assert experiment.name == "e"  # the file's stem when the file names none
    options = experiment.eval_options(tmp_path / "out", force=True, shard=(0, 2), argv=["lctx", "sweep"])
    assert options.depths == [0.0, 0.5] and options.target_len == 16384 and options.train_len == 2048
    assert options.task_args == {"threshold": "85.6", "strict": "true", "name": "x"}
    assert options.data_dir == Path("data/longbench") and options.chat_template is True
    assert (options.stride, options.max_new_tokens, options.needle) == (256, 8, "The key is {value}.")
    assert (options.out, options.force, options.shard) == (tmp_path / "out", True, (0, 2))


def test_sweep_cli_usage_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    invoke = CliRunner().invoke
    done = invoke(app, ["sweep", str(write(tmp_path / "e.toml", GRID + "[options]\nsamplez = 1\n"))])
    assert done.exit_code == 2 and "unknown option 'samplez'" in done.output
    done = invoke(app, ["sweep", str(write(tmp_path / "t.toml", GRID.replace('"ppl"', '"pll"')))])
    assert done.exit_code == 2 and "unknown task 'pll'" in done.output and "passkey" in done.output
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_su_table_sweep_end_to_end(tmp_path) -> None:
    """The shipped experiment runs as is (toy checkpoint, 18 cells: about 2 minutes on 2 CPU cores)."""
    done = CliRunner().invoke(app, ["sweep", str(ROOT / "experiments" / "su-table.toml"), "--out",
                                    str(tmp_path / "results"), "--report", str(tmp_path / "report")])
    assert done.exit_code == 0, done.output
    records = {(r["rope_input"], r["length"]): r["metrics"] for r in results.Store(tmp_path / "results").records()}
    assert len(records) == 18
    # the figure's point: past the training length ReRoPE keeps perplexity low, the unpatched model does not
    assert records[("rerope:window=64", 1024)]["ppl"] < records[("none", 1024)]["ppl"] / 2
    table = (tmp_path / "report" / "tables" / "ppl-ppl-toy-byte-128.csv").read_text().splitlines()
    assert table[0] == "variant,rope,128,512,1024" and len(table) == 7
    assert (tmp_path / "report" / "figures" / "ppl-ppl-toy-byte-128.pdf").is_file()
