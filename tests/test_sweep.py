"""lctx sweep: experiment files, their validation, a resumable run that ends with the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from lctx import patches, plan, results, sweep, view
from lctx.cli import app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def wide_console(monkeypatch) -> None:
    from lctx import cli

    # the attribute, not the property: monkeypatch's undo must restore "no fixed width", not pin today's 80
    monkeypatch.setattr(cli.console, "_width", 200)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_su_table_experiment_plans_its_grid() -> None:
    experiment = sweep.load(ROOT / "experiments" / "su-table.toml")
    assert experiment.name == "su-table" and "ReRoPE" in experiment.description
    assert experiment.task_defaults == {"samples": 4, "last_k": 64} and experiment.settings == {}
    options = experiment.run_options(Path("results") / experiment.name)
    assert options.lengths == [128, 512, 1024]
    the_plan = plan.plan(options)
    assert the_plan.total_cells == 6 * 3 and the_plan.train_lens == {"tests/data/toy-byte-128": 128}
    ropes = {unit.spec.canonical for unit in the_plan.units}
    assert "rerope:window=64:logn=true" in ropes and "ntk:alpha=8:logn=true" in ropes
    assert {unit.task.spec for unit in the_plan.units} == {"ppl:samples=4:last_k=64:data=pydoc"}


def test_smollm2_experiment_compares_variants_past_the_training_length() -> None:
    experiment = sweep.load(ROOT / "experiments" / "smollm2-variants.toml")
    assert experiment.models == ["smollm2-135m"] and experiment.name == "smollm2-variants"
    assert max(experiment.lengths) > 8192 >= min(experiment.lengths)
    assert len(experiment.ropes) >= 5 and "none" in experiment.ropes
    for spec in patches.parse_list(experiment.ropes):  # every variant resolves against an 8192 training length
        spec.resolve(8192, None)
    options = experiment.run_options(Path("out"))
    assert options.task_defaults == {"samples": 4, "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "last_k": 256}


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
    records = view.newest(results.Store(records_dir).read())
    assert sorted((r["rope_input"], r["length"], r["status"]) for r in records) == [
        ("none", 128, "ok"), ("none", 384, "ok"), ("pi:factor=2", 128, "ok"), ("pi:factor=2", 384, "ok")]
    assert {r["config"]["last_k"] for r in records} == {32}
    manifest = json.loads(next(records_dir.glob("manifest-*.json")).read_text())
    assert manifest["status"] == "finished" and manifest["options"]["task_defaults"] == {"samples": 1, "last_k": 32}
    assert manifest["options"]["dtype"] == "float32" and manifest["options"]["device"] == "cpu"
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


GRID = 'models = ["m"]\nropes = ["none"]\ntasks = ["ppl", "passkey"]\nlengths = [1024]\n'


def test_experiment_errors_name_the_key_and_the_valid_choices(tmp_path) -> None:
    message = _error(tmp_path, GRID + "lenghts = [1]\n")
    assert "unknown key(s) 'lenghts'" in message and "name, description, models, ropes, tasks, lengths, options" \
        in message
    message = _error(tmp_path, GRID + "[options]\nsample = 3\n")
    assert "no selected task has a parameter 'sample' (given as sample=3)" in message
    assert "the selected tasks' parameters: chat_template, data, depths, last_k" in message
    assert "lctx sweep --force" in _error(tmp_path, GRID + "[options]\nforce = true\n")
    assert "samples=four is not valid: samples (int ≥ 1" in _error(tmp_path, GRID + '[options]\nsamples = "four"\n')
    assert "samples=0 is not valid" in _error(tmp_path, GRID + "[options]\nsamples = 0\n")  # the CLI's bounds too
    assert "samples=-2 is not valid" in _error(tmp_path, GRID + "[options]\nsamples = -2\n")
    message = _error(tmp_path, GRID + "[options]\nchat_template = 1\n")
    assert "chat_template=1 is not valid: chat_template (bool" in message
    assert "depths=[0,2] is not valid" in _error(tmp_path, GRID + "[options]\ndepths = [0, 2]\n")
    assert "max_memory" in _error(tmp_path, GRID + "[options]\nmax_memory = -1\n")
    assert "prefill_chunk=-4 is not valid" in _error(tmp_path, GRID + "[options]\nprefill_chunk = -4\n")
    assert "missing ropes" in _error(tmp_path, 'models = ["m"]\ntasks = ["ppl"]\nlengths = [1]\n')
    assert "invalid length '4q'" in _error(tmp_path, GRID.replace("[1024]", '["4q"]'))
    assert "ropes must be a non-empty list of strings" in _error(tmp_path, GRID.replace('["none"]', "[]"))
    assert "unknown parameter 'strde'" in _error(tmp_path, GRID.replace('"ppl"', '"ppl:strde=4"'))
    assert "name 'a b'" in _error(tmp_path, 'name = "a b"\n' + GRID)
    assert "not a valid TOML file" in _error(tmp_path, GRID + "[options\n")
    with pytest.raises(sweep.ExperimentError, match="does not exist"):
        sweep.load(tmp_path / "missing.toml")


def test_options_table_sets_run_settings_and_task_parameters(tmp_path) -> None:
    experiment = sweep.load(write(tmp_path / "e.toml", GRID.replace('"passkey"', '"niah"') + '''
[options]
depths = "[0,0.5]"
target_len = "16k"
train_len = 2048
stride = 256
chat_template = true
max_new_tokens = 8
needle = "The key is {value}."
max_memory = "3GiB"
'''))
    assert experiment.name == "e"  # the file's stem when the file names none
    options = experiment.run_options(tmp_path / "out", force=True, shard=(0, 2), argv=["lctx", "sweep"])
    assert (options.target_len, options.train_len, options.max_memory) == (16384, 2048, 3 * 2**30)
    assert (options.out, options.force, options.shard) == (tmp_path / "out", True, (0, 2))
    from lctx import evals

    ppl, niah = evals.resolve(options.tasks, options.task_defaults)
    assert ppl.args.stride == 256 and niah.args.depths == [0.0, 0.5] and niah.args.needle == "The key is {value}."
    assert niah.args.chat_template is True and niah.args.max_new_tokens == 8


def test_sweep_cli_usage_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    invoke = CliRunner().invoke
    done = invoke(app, ["sweep", str(write(tmp_path / "e.toml", GRID + "[options]\nsamplez = 1\n"))])
    assert done.exit_code == 2 and "no selected task has a parameter 'samplez'" in done.output
    done = invoke(app, ["sweep", str(write(tmp_path / "t.toml", GRID.replace('"ppl"', '"pll"')))])
    assert done.exit_code == 2 and "unknown task 'pll'" in done.output and "passkey" in done.output
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_su_table_sweep_end_to_end(tmp_path) -> None:
    """The shipped experiment runs as is (toy checkpoint, 18 cells: about 2 minutes on 2 CPU cores)."""
    done = CliRunner().invoke(app, ["sweep", str(ROOT / "experiments" / "su-table.toml"), "--out",
                                    str(tmp_path / "results"), "--report", str(tmp_path / "report")])
    assert done.exit_code == 0, done.output
    newest = view.newest(results.Store(tmp_path / "results").read())
    records = {(r["rope_input"], r["length"]): r["metrics"] for r in newest}
    assert len(records) == 18
    # the figure's point: past the training length ReRoPE keeps perplexity low, the unpatched model does not
    assert records[("rerope:window=64", 1024)]["ppl"] < records[("none", 1024)]["ppl"] / 2
    table = (tmp_path / "report" / "tables" / "ppl-ppl-toy-byte-128.csv").read_text().splitlines()
    assert table[0] == "variant,rope,128,512,1024" and len(table) == 7
    assert (tmp_path / "report" / "figures" / "ppl-ppl-toy-byte-128.pdf").is_file()


# ---- [train] tables: toy models trained before the grid (experiments/inverse-leaky.toml) -----------------------

TINY_TRAIN = "context = 16\nsteps = 1\nlayers = 1\ndim = 32\nheads = 2\nbatch_size = 4\nwarmup = 1\nthreads = 1\n"
INVERSE = 'rope = "leaky-rerope:window=4:k=0.25"\n'
TWO = 'models = ["a", "b"]\nropes = ["none"]\ntasks = ["ppl"]\nlengths = [16, 32]\n[options]\nsamples = 1\n'


def test_inverse_leaky_experiment_trains_two_alike_models_and_plans_its_grid(tmp_path) -> None:
    from lctx import models

    experiment = sweep.load(ROOT / "experiments" / "inverse-leaky.toml")
    assert experiment.ropes == ["none"] and experiment.lengths == [128, 256, 512, 1024]
    assert experiment.task_defaults["data"] == "pydoc-heldout"  # text neither model trained on
    assert list(experiment.train) == experiment.models
    plain, inverse = experiment.train.values()
    assert plain.rope is None and plain.context == inverse.context == 128
    assert (plain.steps, plain.seed, plain.config, plain.threads) == \
        (inverse.steps, inverse.seed, inverse.config, inverse.threads)  # alike but for the variant
    spec = patches.parse(inverse.rope).resolve(128)
    assert spec.name == "leaky-rerope" and spec.kwargs["k"] < 1
    # the grid plans against untrained models of the two recipes
    dirs = []
    for recipe in experiment.train.values():
        config = recipe.config.model_config(recipe.context)
        if recipe.rope:
            setattr(config, models.TRAIN_ROPE_KEY, spec.canonical)
        dirs.append(str(tmp_path / f"m{len(dirs)}"))
        LlamaForCausalLM(config).save_pretrained(dirs[-1])
    options = experiment.run_options(tmp_path / "results")
    options.models = dirs
    the_plan = plan.plan(options)
    assert the_plan.total_cells == 2 * 4 and set(the_plan.train_lens.values()) == {128}
    assert the_plan.train_ropes == {dirs[1]: spec.canonical}


def test_train_tables_are_checked_when_the_file_is_read(tmp_path) -> None:
    assert "trains a model the experiment does not evaluate" in _error(tmp_path, TWO + '[train."c"]\ncontext = 16\n')
    assert "missing context" in _error(tmp_path, TWO + '[train."a"]\nsteps = 2\n')
    assert "unknown parameter 'step'" in _error(tmp_path, TWO + '[train."a"]\ncontext = 16\nstep = 2\n')
    assert "one table per model directory" in _error(tmp_path, TWO.replace("[options]", "train = 3\n[options]"))
    message = _error(tmp_path, TWO + '[train."b"]\ncontext = 16\nrope = "leaky-rerope:k=0"\n')
    assert "[train.'b']" in message and "k=0 is not valid" in message
    assert "dynamic-ntk depends on the length" in _error(tmp_path, TWO + '[train."b"]\ncontext = 16\n'
                                                         'rope = "dynamic-ntk:factor=2"\n')
    assert "--heads 3 must divide --dim 32" in _error(tmp_path, TWO + '[train."a"]\ncontext = 16\ndim = 32\n'
                                                      "heads = 3\n")


def test_train_tables_train_once_resume_refuse_and_retrain(tmp_path, monkeypatch) -> None:
    import io

    from rich.console import Console

    monkeypatch.chdir(tmp_path)
    text = TWO + '[train."a"]\n' + TINY_TRAIN + '[train."b"]\n' + TINY_TRAIN + INVERSE
    experiment = sweep.load(write(tmp_path / "e.toml", text))
    console = Console(file=io.StringIO(), width=400)
    with pytest.raises(sweep.ExperimentError, match="sharded or launched") as err:
        sweep.train(experiment, distributed=True, console=console)
    assert "lctx toy train --context 16 --out a --steps 1" in str(err.value) and not (tmp_path / "a").exists()
    assert sweep.train(experiment, console=console) == ["a", "b"]
    assert "lctx_train_rope" in (tmp_path / "b" / "config.json").read_text()
    assert sweep.train(experiment, console=console) == []  # the directories hold what the tables describe
    assert "a: already trained by lctx toy train --context 16 --out a" in console.file.getvalue()
    changed = sweep.load(write(tmp_path / "e.toml", text.replace("steps = 1", "steps = 2", 1)))
    with pytest.raises(sweep.ExperimentError, match="a holds a model that"):
        sweep.train(changed, console=console)
    assert sweep.train(changed, force=True, console=console) == ["a", "b"]
    assert "--steps 2" in (tmp_path / "a" / "README.md").read_text()


def test_sweep_trains_then_evaluates_and_the_manifest_names_the_training_variant(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "e.toml", TWO + 'data = "pydoc-heldout"\n[train."a"]\n' + TINY_TRAIN + '[train."b"]\n'
          + TINY_TRAIN + INVERSE)
    done = CliRunner().invoke(app, ["sweep", "e.toml"])
    assert done.exit_code == 0, done.output
    trained_under = "leaky-rerope:window=4:k=0.25:logn=false"
    assert "training a: lctx toy train" in done.output
    assert f"loaded b on cpu (float32, sdpa, training length 16, trained under {trained_under}) in" in done.output
    records = view.newest(results.Store(tmp_path / "results" / "e").read())
    assert sorted((r["model"], r["length"], r["status"]) for r in records) == [
        ("a", 16, "ok"), ("a", 32, "ok"), ("b", 16, "ok"), ("b", 32, "ok")]
    manifest = json.loads(next((tmp_path / "results" / "e").glob("manifest-*.json")).read_text())
    assert manifest["models"] == [{"model": "a", "train_len": 16},
                                  {"model": "b", "train_len": 16, "train_rope": trained_under}]


@pytest.mark.slow
def test_inverse_leaky_sweep_reproduces_the_readme_table(tmp_path, monkeypatch) -> None:
    """The shipped experiment as README runs it (about 10 minutes on 2 CPU cores): both models trained, then the
    perplexities README reports, within 1% (one training thread makes the weights bit-identical on one build)."""
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, ["sweep", str(ROOT / "experiments" / "inverse-leaky.toml")])
    assert done.exit_code == 0, done.output
    records = view.newest(results.Store(tmp_path / "results" / "inverse-leaky").read())
    got = {(Path(r["model"]).name, r["length"]): r["metrics"]["ppl"] for r in records}
    assert len(got) == 8
    readme = (ROOT / "README.md").read_text().splitlines()
    rows = {"rope-128": "| plain RoPE |", "inverse-leaky-128": "| inverse Leaky ReRoPE (w = 32, k = 1/16) |"}
    for model, row in rows.items():
        (line,) = [line for line in readme if line.startswith(row)]
        reported = [float(cell) for cell in line.strip("|").split("|")[1:]]
        for length, value in zip((128, 256, 512, 1024), reported, strict=True):
            assert got[(model, length)] == pytest.approx(value, rel=0.01), (model, length)
