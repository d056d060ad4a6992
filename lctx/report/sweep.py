"""``lctx sweep EXPERIMENT.toml``: run an experiment file through the eval runner, then write its report.

An experiment file names the grid and the task options::

    name = "su-table"                        # results/<name>/ and report/<name>/ by default
    description = "what the figure shows"    # shown on the dashboard
    models = ["tests/data/toy-byte-128"]     # as --model: aliases, directories, .gguf files, hub ids
    ropes = ["none", "ntk:factor=8"]         # as --rope
    tasks = ["ppl"]                          # as --task
    lengths = [128, 512, "1k"]               # as --lengths

    [options]                                # any field of lctx.evals.EvalOptions, e.g.
    samples = 4                              #   samples, depths, last_k, stride, seed, dtype, device,
    last_k = 64                              #   max_new_tokens, data, dataset, data_dir, task_args, ...

Relative paths in it are relative to the current directory, like the command line's. Running it again resumes:
the results store skips the cells already recorded (``--force`` recomputes them). The report covers exactly
the experiment's cells, even when its results directory holds other runs too.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from lctx import evals, results, runner
from lctx.evals import EvalOptions

FIELDS = {"name": "str", "description": "str", "models": "list", "ropes": "list", "tasks": "list",
          "lengths": "list", "options": "table"}
REQUIRED = ("models", "ropes", "tasks", "lengths")
# EvalOptions fields that the grid or the command line sets, not the [options] table
NOT_OPTIONS = {"models": "the top-level models list", "ropes": "the top-level ropes list",
               "tasks": "the top-level tasks list", "lengths": "the top-level lengths list",
               "out": "lctx sweep --out", "force": "lctx sweep --force", "shard": "lctx sweep --shard",
               "argv": None}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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
    options: dict[str, Any] = field(default_factory=dict)  # EvalOptions fields, converted

    def eval_options(self, out: Path, *, force: bool = False, shard: tuple[int, int] | None = None,
                     argv: list[str] | None = None) -> EvalOptions:
        return EvalOptions(models=list(self.models), ropes=list(self.ropes), tasks=list(self.tasks),
                           lengths=list(self.lengths), out=Path(out), force=force, shard=shard,
                           argv=list(argv or []), **self.options)


def option_names() -> list[str]:
    """The keys an [options] table may have."""
    return [f.name for f in dataclasses.fields(EvalOptions) if f.name not in NOT_OPTIONS]


def _strings(path: Path, key: str, value: Any) -> list[str]:
    """A list of strings, or one string of comma-separated items (as on the command line)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ExperimentError(f"{path}: {key} must be a non-empty list of strings, e.g. {key} = "
                              f"{_EXAMPLES[key]}; got {value!r}")
    return [v.strip() for v in value]


_EXAMPLES = {"models": '["smollm2-135m"]', "ropes": '["none", "yarn:factor=4"]', "tasks": '["ppl", "passkey"]'}


def _lengths(path: Path, value: Any) -> list[int]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, int | str) and not isinstance(v, bool) for v in items):
        raise ExperimentError(f"{path}: lengths must be a list of token counts, e.g. lengths = [4096, \"8k\"]; "
                              f"got {value!r}")
    try:
        return sorted({n for v in items for n in ([runner.parse_length(v)] if isinstance(v, int)
                                                  else runner.parse_lengths(v))})
    except ValueError as err:
        raise ExperimentError(f"{path}: lengths: {err}") from None


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path (string)"}
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    if typing.get_origin(hint) is dict:
        return "a table of key = value pairs"
    return names.get(hint, str(hint))


def _convert(key: str, value: Any, hint: Any) -> Any:
    """A TOML value as the EvalOptions field needs it; ValueError saying what was expected."""
    if key == "depths":  # a list of fractions, or the command line's comma-separated string
        return runner.parse_depths(value if isinstance(value, str) else [str(v) for v in _as_list(value)])
    if key in ("target_len", "train_len") and isinstance(value, str):
        return runner.parse_length(value)
    if key == "task_args":
        if not isinstance(value, dict) or not all(isinstance(v, str | int | float | bool) for v in value.values()):
            raise ValueError("expected a table of KEY = value pairs, e.g. task_args = { threshold = 85.6 }")
        return {str(k): (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in value.items()}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: TOML has no null, so X
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return [_convert(key, v, typing.get_args(hint)[0]) for v in _as_list(value)]
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, int | float) and not isinstance(value, bool), str: isinstance(value, str),
          Path: isinstance(value, str)}.get(hint)
    if ok is None:
        raise ValueError(f"options of type {hint} cannot be set from an experiment file")
    if not ok:
        raise ValueError(f"expected {_describe(hint)}")
    return Path(value) if hint is Path else float(value) if hint is float else value


def _as_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("expected a list")
    return value


def _options(path: Path, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ExperimentError(f"{path}: options must be a table ([options] with key = value lines)")
    hints = typing.get_type_hints(EvalOptions)
    valid = option_names()
    out = {}
    for key, value in table.items():
        if key in NOT_OPTIONS:
            where = NOT_OPTIONS[key]
            raise ExperimentError(f"{path}: [options] {key} is not an experiment option"
                                  + (f"; set it with {where}" if where else "")
                                  + f". Valid options: {', '.join(valid)}")
        if key not in valid:
            raise ExperimentError(f"{path}: unknown option {key!r} in [options]. Valid options: {', '.join(valid)}")
        try:
            out[key] = _convert(key, value, hints[key])
        except ValueError as err:
            raise ExperimentError(f"{path}: [options] {key} = {value!r}: {err}") from None
    return out


def load(path: str | Path) -> Experiment:
    """Read and check an experiment file; everything wrong with it is an ExperimentError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {str(path)!r} does not exist (see experiments/*.toml)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ExperimentError(f"{path}: not a valid TOML file: {err}") from None
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise ExperimentError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}. Valid keys: "
                              f"{', '.join(FIELDS)} (task options go in the [options] table)")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ExperimentError(f"{path}: missing {', '.join(missing)}; an experiment lists "
                              f"{', '.join(REQUIRED)} (and optionally name, description, [options])")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ExperimentError(f"{path}: name {name!r} must be letters, digits, '.', '_' or '-' (it names the "
                              "results and report directories)")
    description = data.get("description")
    if description is not None and not isinstance(description, str):
        raise ExperimentError(f"{path}: description must be a string; got {description!r}")
    return Experiment(path=path, name=name, description=description, models=_strings(path, "models", data["models"]),
                      ropes=_strings(path, "ropes", data["ropes"]), tasks=_strings(path, "tasks", data["tasks"]),
                      lengths=_lengths(path, data["lengths"]), options=_options(path, data.get("options", {})))


def experiment_records(options: EvalOptions) -> list[dict[str, Any]]:
    """The latest records of the experiment's own cells (its directory may hold other runs' cells too)."""
    plan = runner.plan(dataclasses.replace(options, shard=None))
    keys = {unit.key(cell) for unit in plan.units for cell in unit.cells}
    return [r for k, r in results.Store(options.out).latest().items() if k in keys]


def run(path: str | Path, *, out: str | Path | None = None, report_out: str | Path | None = None,
        force: bool = False, shard: tuple[int, int] | None = None, console: Console | None = None,
        argv: list[str] | None = None) -> int:
    """Run the experiment (resumable) and write its report; returns the runner's exit status.

    Raises ExperimentError, or one of :data:`lctx.runner.USAGE_ERRORS`, before anything runs.
    """
    from lctx import report

    console = console or Console()
    experiment = load(path)
    out = Path(out) if out is not None else Path("results") / experiment.name
    report_out = Path(report_out) if report_out is not None else Path("report") / experiment.name
    options = experiment.eval_options(out, force=force, shard=shard, argv=argv)
    evals.parse_tasks(options.tasks)  # a bad task name fails here, before the summary line
    console.print(f"sweep {experiment.name}: {len(experiment.models)} model(s) × {len(experiment.ropes)} variant(s) "
                  f"× {len(experiment.tasks)} task(s) × {len(experiment.lengths)} length(s) → {out}")
    code = runner.run(options, console)
    if code == runner.EXIT_INTERRUPTED:
        console.print("[yellow]Interrupted:[/] no report written; run the same command to resume.")
        return code
    records = experiment_records(options)
    if not records:
        console.print(f"[yellow]No records of this experiment in {out}; no report written.[/]")
        return code or runner.EXIT_ERRORS
    written = report.write(records, report_out, title=experiment.name, description=experiment.description,
                           source=str(out))
    console.print(f"Report: {written.index}  ({len(written.tables)} tables, {len(written.figures)} figure files)")
    return code
