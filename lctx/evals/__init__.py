"""Evaluation tasks behind one registry, named and parameterised with the RoPE grammar.

A task is a spec: ``ppl:stride=512:last_k=256``, ``passkey:depths=[0,0.5,1]``,
``synthetic:niah-multikey:keys=4:haystack=noise``, ``longbench:qasper``, ``lm-eval:hellaswag:num_fewshot=5``.
Its parameters are :class:`lctx.spec.Param` declarations on the task class (types, defaults, bounds, help):
unknown keys and bad values are rejected before any model loads, with the valid choices, whether they come
from ``--task``, from a run-wide flag (``--samples 3`` sets ``samples`` on every task that has it), from
``--task-arg`` or from an experiment file. The canonical spec (name and every parameter that changes results)
is a cell's task identity in the records.

**Adding a task** is one module: a :class:`Task` subclass that declares its parameters, metrics and figures,
builds requests (:mod:`lctx.engine`: ``nll`` or ``generate``) and scores answers — and one line in
:data:`TASKS` (or :data:`FAMILIES` for a ``family:member`` family), registered lazily as ``"module:object"`` so
that importing lctx never imports a task's heavy dependencies (lm-eval above all).

The runner (:mod:`lctx.execute`) owns everything around a task: planning, resume, timing, memory, failures and
records. The view (:mod:`lctx.view`) reads the metrics and figures a task declares to present its records.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lctx import spec as grammar
from lctx.patches import RopeSpec
from lctx.spec import Param, SpecError, format_length


class TaskError(ValueError):
    """An unknown task, a bad task parameter, or task settings that do not fit the data or the lengths."""


# ---- what a task declares --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resample:
    """How a metric is recomputed from a resample of its cell's per-record ``samples`` (bootstrap intervals):
    ``scale · Σ value / Σ weight`` over the samples (their mean without ``weight``), exponentiated with ``exp``.
    E.g. perplexity: ``Resample("nll_sum", "tokens", exp=True)`` (documents resampled, token-weighted)."""

    value: str
    weight: str | None = None
    scale: float = 1.0
    exp: bool = False


@dataclass(frozen=True)
class Metric:
    """A metric a task records: its direction (as lm-eval declares ``higher_is_better``) and how to show it.

    ``headline`` metrics get a table (and a figure) by default; ``percent`` ones are fractions shown ×100 with
    ``%``; ``counts`` names the (successes, trials) metrics from which pooled cells recompute the value and its
    Wilson interval; ``interval`` the (low, high) metrics of a recorded 95% interval; ``resample`` how a
    bootstrap over the records' samples recomputes it (its 95% interval when there are no counts).
    """

    name: str
    higher_is_better: bool | None  # None only for metrics of tasks lctx does not know (no direction to judge)
    headline: bool = False
    percent: bool = False
    label: str = ""
    counts: tuple[str, str] | None = None
    interval: tuple[str, str] | None = None
    resample: Resample | None = None


ACCURACY = Metric("accuracy", True, headline=True, percent=True, label="accuracy", counts=("correct", "trials"),
                  interval=("ci_low", "ci_high"))

# Figure kinds a task may declare (drawn by lctx.view.figures): a line per variant over length for each headline
# metric; the loss by position in the window; accuracy heatmaps over length × depth.
FIGURES = ("lines", "position_loss", "heatmap")


@dataclass(frozen=True)
class Cell:
    """One result: a task at one length (and depth) for one model and resolved RoPE variant."""

    length: int
    depth: float | None = None

    @property
    def label(self) -> str:
        return format_length(self.length) + ("" if self.depth is None else f" @{self.depth:g}")


@dataclass
class Outcome:
    """What a task computed for one cell: aggregated metrics, per-sample values, and extras for the record."""

    metrics: dict[str, Any]
    samples: list[dict[str, Any]]
    data: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # printed next to the cell's result (e.g. documents skipped)


Report = Callable[[float], None]  # advance the progress display by this much estimated cost


def forward_cost(length: int) -> float:
    """Rough relative cost of one forward over ``length`` tokens (linear layers plus quadratic attention)."""
    return length * (1 + length / 2048)


class Args:
    """A task's resolved parameters, read as ``args.samples`` (not a Mapping: parameters may be called ``keys`` or
    ``values``, as RULER's are)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


# ---- common parameters -----------------------------------------------------------------------------------------


def samples_param(default: int | None, what: str) -> Param:
    return Param("samples", int, default, what, ge=1)


SEED = Param("seed", int, 0, "seed of the prompts' random choices (keys, filler offsets, needles)", ge=0)
CHAT_TEMPLATE = Param("chat_template", bool, False, "wrap the prompt in the tokenizer's chat template")
DATA = Param("data", str, "pydoc", "corpus: pydoc (the Python reference manual, offline), pydoc-heldout (its last "
             "10%, which lctx toy train never trains on), a .txt file, a directory of .txt files, a .jsonl file, or "
             "hf:NAME[:config][:split] (a hub dataset)")
TEXT_FIELD = Param("text_field", str, "text", "text field of a .jsonl corpus or hub dataset", identity=False)
DEPTHS = Param("depths", list[float], [0.0, 0.25, 0.5, 0.75, 1.0], "needle depths in [0, 1] (0 = start of the "
               "context, 1 = end): one cell per depth", ge=0, le=1, identity=False)


def max_new_tokens_param(default: int) -> Param:
    return Param("max_new_tokens", int, default, "tokens to generate at most", ge=1)


# ---- tasks -----------------------------------------------------------------------------------------------------


class Task:
    """A task with its parameters resolved; see the module docstring."""

    description: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    metrics: ClassVar[tuple[Metric, ...]] = ()
    figures: ClassVar[tuple[str, ...]] = ("lines",)
    uses_depths: ClassVar[bool] = False
    member_params: ClassVar[tuple[str, ...]] = ()  # parameters whose values differ between a family's members
    memory_profile: ClassVar[str] = "prefill"  # what it keeps of the last layer: lctx.memory.PROFILES

    def __init__(self, name: str, args: Mapping[str, Any]) -> None:
        self.name = name
        self.args = Args(args)

    def __repr__(self) -> str:
        return f"<task {self.spec}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Task) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    # -- identity --

    def identity(self) -> dict[str, Any]:
        """The parameters that change results, in declaration order: the records' ``config``."""
        return {p.name: self.args[p.name] for p in self.params if p.identity}

    @property
    def spec(self) -> str:
        """The canonical spec: the task's identity in the records (``passkey:samples=5:seed=0:…``); parameters
        left unset (None: every example, no stride) are omitted."""
        return canonical(self.name, self.identity())

    @classmethod
    def upgrade(cls, config: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
        """A config recorded before task specs (schema 1) as today's identity: keys this task no longer has
        are dropped (they were derived from others), parameters it did not record get their defaults (what
        it did then). Tasks that renamed a parameter override this."""
        return {p.name: config.get(p.name, defaults[p.name]) for p in cls.params if p.identity}

    @classmethod
    def record_metrics(cls, record: Mapping[str, Any]) -> tuple[Metric, ...]:
        """The metrics of a record of this task (lm-eval tasks read them from the record)."""
        return cls.metrics

    # -- planning --

    def validate(self) -> None:
        """Raise TaskError for settings that cannot work (data missing, …), before any model loads."""

    def check_lengths(self, lengths: Sequence[int]) -> None:
        """Raise TaskError for lengths this task cannot use (before any model loads)."""

    def cells(self, lengths: Sequence[int]) -> list[Cell]:
        if self.uses_depths:
            return [Cell(length, depth) for length in lengths for depth in sorted(set(self.args.depths))]
        return [Cell(length) for length in lengths]

    def groups(self, spec: RopeSpec, cells: list[Cell]) -> list[list[Cell]]:
        """Units of work; by default one per cell."""
        return [[cell] for cell in cells]

    def count(self) -> int:
        """How many samples (documents, trials, examples) a cell takes."""
        return self.args.get("samples") or 1

    def cost(self, cells: list[Cell]) -> float:
        """Estimated cost of computing ``cells`` as one group (for progress ETA and shard balance)."""
        return sum(forward_cost(c.length) for c in cells) * self.count()

    def memory_batch(self) -> int:
        """Sequences of a cell's length in memory at once (for the up-front memory estimate)."""
        return 1

    # -- running --

    def check(self, engine, cells: list[Cell]) -> None:
        """Fail early (DataError/TaskError) when the data cannot serve these cells; ``engine`` may hold only a
        tokenizer (before the weights load)."""

    def run(self, engine, spec: RopeSpec, cells: list[Cell], report: Report) -> dict[Cell, Outcome]:
        raise NotImplementedError


# ---- the registry ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskType:
    """A task name bound to its class and to member presets (a family member's defaults, RULER-style data)."""

    name: str
    cls: type[Task]
    preset: tuple[tuple[str, Any], ...] = ()  # parameter defaults of this member
    description: str = ""
    attrs: tuple[tuple[str, Any], ...] = ()  # member facts set on the task (a LongBench dataset, a RULER name)

    @property
    def params(self) -> tuple[Param, ...]:
        preset = dict(self.preset)
        return tuple(dataclasses.replace(p, default=preset[p.name]) if p.name in preset else p
                     for p in self.cls.params)

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def create(self, values: Mapping[str, Any]) -> Task:
        missing = [p for p in self.params if p.required and p.name not in values]
        if missing:
            raise TaskError(f"{self.name}: missing required parameter {missing[0].name!r}. Parameters: "
                            f"{grammar.describe_params(self.params)}")
        task = self.cls(self.name, {**self.defaults, **values})
        for key, value in self.attrs:
            setattr(task, key, value)
        task.validate()
        return task


@dataclass(frozen=True)
class TaskFamily:
    """Tasks named ``prefix:member``. ``resolve`` turns a member (or a group such as ``all``) into task types and
    raises TaskError naming the valid members; ``listed`` gives the members ``lctx tasks`` shows. ``figure``
    and ``summary`` name the family-level views (lctx.view) that compare its members side by side."""

    prefix: str
    members: str  # for help texts, e.g. "all|niah-single|…"
    resolve: Callable[[str], list[TaskType]]
    listed: Callable[[], list[TaskType]]
    figure: str | None = None
    summary: str | None = None
    categories: tuple[str, ...] = ()  # the order of the members' ``category`` attrs (LongBench's six)


# name -> "module:object" holding a TaskType (plain tasks) or a TaskFamily (families); imported on first use.
TASKS = {
    "ppl": "lctx.evals.ppl:TYPE",
    "passkey": "lctx.evals.passkey:TYPE",
    "niah": "lctx.evals.niah:TYPE",
    "longbench-v2": "lctx.evals.longbench:V2",
}
FAMILIES = {
    "synthetic": "lctx.evals.synthetic:FAMILY",
    "longbench": "lctx.evals.longbench:FAMILY",
    "lm-eval": "lctx.evals.lm_eval_task:FAMILY",
}


def canonical(name: str, identity: Mapping[str, Any]) -> str:
    return grammar.canonical(name, [(k, v) for k, v in identity.items() if v is not None])


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def family(prefix: str) -> TaskFamily:
    return _load(FAMILIES[prefix])


def task_names() -> list[str]:
    """Every task name, families as ``prefix:<members>``, for help texts and error messages."""
    return sorted(TASKS) + [f"{prefix}:<{family(prefix).members}>" for prefix in sorted(FAMILIES)]


def expand(name: str) -> list[TaskType]:
    """The task types a name stands for: one registered task, or the members of a family."""
    if name in TASKS:
        return [_load(TASKS[name])]
    prefix, sep, member = name.partition(":")
    if prefix in TASKS and sep:
        raise TaskError(f"task {name!r}: {member.split(':')[0]!r} is not key=value. Grammar: {grammar.GRAMMAR}")
    if sep and prefix in FAMILIES:
        if not member:
            raise TaskError(f"task {name!r} names no member of {prefix!r}: use {prefix}:<{family(prefix).members}>")
        return family(prefix).resolve(member)
    raise TaskError(f"unknown task {name!r}. Valid tasks: {', '.join(task_names())}")


def task_type(name: str) -> TaskType | None:
    """The type of a task named in a record (one task, not a group); None for names lctx does not know."""
    try:
        types = expand(name)
    except (TaskError, ImportError):
        return None
    return types[0] if len(types) == 1 else None


def listed() -> list[TaskType]:
    """Every task ``lctx tasks`` shows: the plain tasks and each family's members."""
    out = [_load(TASKS[name]) for name in sorted(TASKS)]
    for prefix in sorted(FAMILIES):
        out += family(prefix).listed()
    return out


def _raw_pairs(values: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (values or {}).items() if v is not None}


def resolve(specs: str | Sequence[str], defaults: Mapping[str, Any] | None = None) -> list[Task]:
    """Task specs (comma-separated and/or repeated) as tasks, in order, without repeats.

    ``defaults`` are run-wide parameter values (``--samples``, ``--task-arg``, an experiment's [options]) applied
    to every task that declares the parameter; a spec's own ``key=value`` wins over them. A default no selected
    task declares is an error (a typo must not be ignored). Within one list, a name that is neither a task nor
    ``family:member`` continues the family before it: ``lm-eval:hellaswag,arc_easy``.
    """
    defaults = _raw_pairs(defaults)
    tasks: list[Task] = []
    used: set[str] = set()
    items = [specs] if isinstance(specs, str) else list(specs)
    try:
        for item in items:
            previous = None
            for text in grammar.split_list(item):
                if not text:
                    raise TaskError(f"empty task name in {item!r}. Valid tasks: {', '.join(task_names())}")
                parsed = grammar.parse(text)
                name = parsed.name
                prefix = name.partition(":")[0]
                if prefix in FAMILIES and ":" in name:
                    previous = prefix
                elif previous and name not in TASKS and prefix not in FAMILIES:
                    name = f"{previous}:{name}"
                for kind in expand(name):
                    declared = {p.name for p in kind.params}
                    given = {k: v for k, v in defaults.items() if k in declared}
                    used.update(given)
                    values = grammar.convert_all(kind.name, kind.params, given.items())
                    values.update(grammar.convert_all(kind.name, kind.params, parsed.params))
                    task = kind.create(values)
                    if task not in tasks:
                        tasks.append(task)
    except SpecError as err:
        raise TaskError(str(err)) from None
    if not tasks:
        raise TaskError(f"no task given. Valid tasks: {', '.join(task_names())}")
    unused = [k for k in defaults if k not in used]
    if unused:
        declared = sorted({p.name for t in tasks for p in t.params})
        given = defaults[unused[0]]
        shown = given if isinstance(given, str) else grammar.format_value(given)
        raise TaskError(f"no selected task has a parameter {unused[0]!r} (given as {unused[0]}={shown}); the "
                        f"selected tasks' parameters: {', '.join(declared)}")
    return tasks


# ---- records ---------------------------------------------------------------------------------------------------


def upgrade(record: dict[str, Any]) -> dict[str, Any]:
    """A record in today's form: schema-1 records (before task specs) get ``task_spec`` and today's ``config``.

    Records of tasks lctx no longer knows keep their config and get a spec built from it, so they still show.
    """
    if record.get("task_spec"):
        return record
    name = str(record.get("task", ""))
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    kind = task_type(name)
    if kind is not None:
        config = kind.cls.upgrade(config, kind.defaults)
    return {**record, "config": config, "task_spec": canonical(name, config)}


def metrics_of(record: Mapping[str, Any]) -> tuple[Metric, ...]:
    """The metrics a record's task declares (empty for tasks lctx does not know)."""
    kind = task_type(str(record.get("task", "")))
    return kind.cls.record_metrics(record) if kind is not None else ()


def describe(kind: TaskType) -> dict[str, Any]:
    """A task type for ``lctx tasks --json``."""
    cls = kind.cls
    return {
        "name": kind.name,
        "description": kind.description or cls.description,
        "params": [{"name": p.name, "type": grammar.type_name(p.type), "default": p.default, "required": p.required,
                    "bounds": p.bounds() or None, "identity": p.identity, "help": p.help} for p in kind.params],
        "metrics": [{"name": m.name, "higher_is_better": m.higher_is_better, "headline": m.headline}
                    for m in cls.metrics],
        "figures": list(cls.figures),
        "example": grammar.canonical(kind.name, [(p.name, p.default) for p in kind.params
                                                 if p.identity and p.default is not None][:2]),
    }


def common_params(tasks: Iterable[Task]) -> list[str]:
    return sorted({p.name for t in tasks for p in t.params})
