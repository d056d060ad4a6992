"""``lctx sweep EXPERIMENT.toml``: run an experiment file, then write its report.

An experiment file names the grid in the same specs as the command line::

    name = "su-table"                        # results/<name>/ and report/<name>/ by default
    description = "what the figure shows"    # shown on the dashboard
    models = ["tests/data/toy-byte-128"]     # as --model: aliases, directories, .gguf files, hub ids
    ropes = ["none", "ntk:factor=8"]         # as --rope
    tasks = ["ppl:last_k=64"]                # as --task: task specs with their parameters
    lengths = [128, 512, "1k"]               # as --lengths

    [options]                                # run settings (dtype, device, attn, device_map, train_len,
    samples = 4                              #   target_len, max_memory, prefill_chunk, batch_size, report,
    dtype = "fp32"                           #   executor, ray_address) and task parameters for every task
                                             #   that has them (samples, depths, …)

    [train."results/toy/rope-128"]           # optional: a toy model to train first (one of the models), with
    context = 128                            #   the `lctx toy train` options as keys (context required; rope,
    rope = "leaky-rerope:k=0.0625"           #   steps, seed, dim, threads, …; see lctx.toy.RECIPE_PARAMS)

Every value is checked by the parameter it sets, as on the command line; a key that is neither a run setting nor
a parameter of a selected task is an error naming the valid ones. Relative paths are relative to the current
directory. Running it again resumes: the results store skips the cells already recorded (``--force`` recomputes
them), and a ``[train]`` model whose directory holds the model its table trains (the command in its README) is
not trained again (``--force`` retrains it; a directory holding another model is an error without it). The
report covers exactly the experiment's cells, even when its results directory holds other runs too.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from lctx import evals, execute, options, patches, results, toy, view
from lctx.execute import launch
from lctx.spec import SpecError

FIELDS = ("name", "description", "models", "ropes", "tasks", "lengths", "options", "train")
REQUIRED = ("models", "ropes", "tasks", "lengths")
NOT_OPTIONS = {"out": "lctx sweep --out", "force": "lctx sweep --force", "shard": "lctx sweep --shard",
               "models": "the top-level models list", "ropes": "the top-level ropes list",
               "tasks": "the top-level tasks list", "lengths": "the top-level lengths list"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_EXAMPLES = {"models": '["smollm2-135m"]', "ropes": '["none", "yarn:factor=4"]', "tasks": '["ppl", "passkey"]'}


class ExperimentError(ValueError):
    """An experiment file that cannot be read or does not describe a valid grid."""


@dataclass
class Experiment:
    path: Path
    name: str
    description: str | None
    models: list[str]
    ropes: list[str]
    tasks: list[str]
    lengths: list[int]
    settings: dict[str, Any] = field(default_factory=dict)  # run settings, converted
    task_defaults: dict[str, Any] = field(default_factory=dict)  # checked when the tasks are resolved
    train: dict[str, toy.Recipe] = field(default_factory=dict)  # model directory -> how to train it first

    def run_options(self, out: Path, *, force: bool = False, shard: tuple[int, int] | None = None,
                    argv: list[str] | None = None) -> options.RunOptions:
        return options.RunOptions(models=list(self.models), ropes=list(self.ropes), tasks=list(self.tasks),
                                  lengths=list(self.lengths), task_defaults=dict(self.task_defaults), out=Path(out),
                                  force=force, shard=shard, argv=list(argv or []), **self.settings)


def _strings(path: Path, key: str, value: Any) -> list[str]:
    """A list of strings, or one string of comma-separated items (as on the command line)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ExperimentError(f"{path}: {key} must be a non-empty list of strings, e.g. {key} = "
                              f"{_EXAMPLES[key]}; got {value!r}")
    return [v.strip() for v in value]


def _lengths(path: Path, value: Any) -> list[int]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, int | str) and not isinstance(v, bool) for v in items):
        raise ExperimentError(f"{path}: lengths must be a list of token counts, e.g. lengths = [4096, \"8k\"]; "
                              f"got {value!r}")
    try:
        return options.lengths(items)
    except SpecError as err:
        raise ExperimentError(f"{path}: lengths: {err}") from None


def _options(path: Path, table: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """[options] split into run settings (converted here) and task parameter defaults."""
    if not isinstance(table, dict):
        raise ExperimentError(f"{path}: options must be a table ([options] with key = value lines)")
    for key in table:
        if key in NOT_OPTIONS:
            raise ExperimentError(f"{path}: [options] {key} is not an experiment option; set it with "
                                  f"{NOT_OPTIONS[key]}")
    run = {k: v for k, v in table.items() if k in options.RUN_PARAM_NAMES}
    try:
        settings = options.run_settings(run, f"{path}: [options]")
    except (SpecError, ValueError) as err:
        raise ExperimentError(str(err)) from None
    return settings, {k: v for k, v in table.items() if k not in options.RUN_PARAM_NAMES}


def _train(path: Path, table: Any, models: list[str]) -> dict[str, toy.Recipe]:
    """[train."DIR"] tables: the toy models to train before the grid runs, each one of the models."""
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ExperimentError(f"{path}: train must hold one table per model directory, e.g. "
                              '[train."results/toy/rope-128"] with context = 128')
    recipes = {}
    for directory, recipe in table.items():
        if directory not in models:
            raise ExperimentError(f"{path}: [train.{directory!r}] trains a model the experiment does not "
                                  f"evaluate; add {directory!r} to models (models: {', '.join(models)})")
        try:
            recipes[directory] = toy.Recipe.from_table(recipe, directory, f"{path}: [train.{directory!r}]")
        except (SpecError, ValueError) as err:
            raise ExperimentError(str(err)) from None
    return recipes


def load(path: str | Path) -> Experiment:
    """Read and check an experiment file; everything wrong with it is an ExperimentError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {str(path)!r} does not exist (see experiments/*.toml)")
    try:
        content = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ExperimentError(f"{path}: not a valid TOML file: {err}") from None
    unknown = [k for k in content if k not in FIELDS]
    if unknown:
        raise ExperimentError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}. Valid keys: "
                              f"{', '.join(FIELDS)} (run settings and task parameters go in the [options] table)")
    missing = [k for k in REQUIRED if k not in content]
    if missing:
        raise ExperimentError(f"{path}: missing {', '.join(missing)}; an experiment lists "
                              f"{', '.join(REQUIRED)} (and optionally name, description, [options])")
    name = content.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ExperimentError(f"{path}: name {name!r} must be letters, digits, '.', '_' or '-' (it names the "
                              "results and report directories)")
    description = content.get("description")
    if description is not None and not isinstance(description, str):
        raise ExperimentError(f"{path}: description must be a string; got {description!r}")
    settings, defaults = _options(path, content.get("options", {}))
    tasks = _strings(path, "tasks", content["tasks"])
    try:
        evals.resolve(tasks, defaults)  # every task parameter checked now, where the file is named
    except evals.TaskError as err:
        raise ExperimentError(f"{path}: {err}") from None
    models = _strings(path, "models", content["models"])
    return Experiment(path=path, name=name, description=description, models=models,
                      ropes=_strings(path, "ropes", content["ropes"]), tasks=tasks,
                      lengths=_lengths(path, content["lengths"]), settings=settings, task_defaults=defaults,
                      train=_train(path, content.get("train", {}), models))


def train(experiment: Experiment, *, force: bool = False, distributed: bool = False,
          console: Console | None = None) -> list[str]:
    """Train the experiment's [train] models its directories do not hold yet (all of them with ``force``).

    Everything is checked before anything trains: a directory holding another model is an ExperimentError
    (unless ``force``), as is training in a ``distributed`` run (shards or launched ranks would each train the
    same model; the message names the commands to run first), and a variant of the grid that does not parse is
    a SpecError. Returns the directories trained.
    """
    console = console or Console()
    todo = []
    for directory, recipe in experiment.train.items():
        state = recipe.trained(directory)
        if state and not force:
            console.print(f"{directory}: already trained by {recipe.command(directory)}", highlight=False)
            continue
        if state is False and not force:
            raise ExperimentError(f"{experiment.path}: {directory} holds a model that [train.{directory!r}] does "
                                  f"not describe (its README lacks `{recipe.command(directory)}`); delete it, "
                                  "train elsewhere, or pass --force to retrain it")
        todo.append(directory)
    if todo:  # the grid's variants are checked by the plan, after training: the typos before minutes of it
        patches.parse_list(experiment.ropes)
    if todo and distributed:
        commands = "; ".join(experiment.train[d].command(d) for d in todo)
        raise ExperimentError(f"{experiment.path}: a sharded or launched sweep does not train its [train] models "
                              f"(every process would); train them first: {commands}")
    for directory in todo:
        console.print(f"training {directory}: {experiment.train[directory].command(directory)}", highlight=False)
        try:
            experiment.train[directory].train(directory)
        except ValueError as err:  # unwritable directory, diverged training: one line, as from lctx toy train
            raise ExperimentError(f"{experiment.path}: training {directory}: {err}") from None
    return todo


def run(path: str | Path, *, out: str | Path | None = None, report_out: str | Path | None = None,
        force: bool = False, shard: tuple[int, int] | None = None, console: Console | None = None,
        argv: list[str] | None = None, settings: dict[str, Any] | None = None) -> int:
    """Run the experiment (resumable) and write its report; returns the run's exit status. ``settings`` are run
    settings given on the command line (``--executor``), over the file's.

    With ``--shard`` no report is written: the other shards' cells are missing (``lctx report`` once all have
    run); under a launcher, rank 0 writes it once every rank is done.

    The ``[train]`` models are trained first (see :func:`train`).

    Raises ExperimentError, or one of :data:`lctx.execute.USAGE_ERRORS`, before anything runs.
    """
    console = console or Console()
    experiment = load(path)
    experiment.settings.update(settings or {})
    train(experiment, force=force, distributed=shard is not None or launch.from_env() is not None, console=console)
    out = Path(out) if out is not None else Path("results") / experiment.name
    report_out = Path(report_out) if report_out is not None else Path("report") / experiment.name
    run_options = experiment.run_options(out, force=force, shard=shard, argv=argv)
    run_options.report = False  # the sweep's own report (of exactly its cells) is written below
    console.print(f"sweep {experiment.name}: {len(experiment.models)} model(s) × {len(experiment.ropes)} variant(s) "
                  f"× {len(experiment.tasks)} task spec(s) × {len(experiment.lengths)} length(s) → {out}")
    result = execute.run(run_options, console)
    if result.code == execute.EXIT_INTERRUPTED:
        console.print("[yellow]Interrupted:[/] no report written; run the same command to resume.")
        return result.code
    if not result.lead:
        return result.code
    if shard is not None:
        console.print(f"Shard {shard[0]}/{shard[1]} done; no report written (the other shards' cells are missing). "
                      f"Once every shard has run: lctx report {out} --out {report_out}", highlight=False)
        return result.code
    records = [r for r in view.newest(results.Store(out).read())
               if results.cell_key(r) in result.plan.all_keys]
    if not records:
        console.print(f"[yellow]No records of this experiment in {out}; no report written.[/]")
        return result.code or execute.EXIT_ERRORS
    written = view.write(records, report_out, title=experiment.name, description=experiment.description,
                         source=str(out))
    console.print(f"Report: {written.index}  ({len(written.tables)} tables, {len(written.figures)} figure files)")
    return result.code
