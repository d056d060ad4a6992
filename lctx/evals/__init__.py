"""Evaluation tasks behind one registry.

A task is added by writing one module with a :class:`Task` subclass decorated with :func:`register`, and
importing it at the bottom of this file. A family of tasks named ``family:member`` (``longbench:qasper``,
``synthetic:niah-single``, ``lm-eval:hellaswag``) registers a factory with :func:`register_family` instead; it
turns the member name into tasks (``longbench:all`` may expand to many).

The runner (:mod:`lctx.runner`) owns everything around a task: cells, resume, sharding, timing, memory,
OOM handling and records. A task says

* which cells a run has (:meth:`Task.cells`: lengths, and depths for retrieval tasks) and which options
  belong in each cell's key (:meth:`Task.config`);
* how cells group into units of work (:meth:`Task.groups`: perplexity computes all lengths of a
  length-independent variant in one forward);
* how to check the data before anything runs (:meth:`Task.check`) and how to compute a group
  (:meth:`Task.run`), returning one :class:`Outcome` per cell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lctx.patches import RopeSpec


class TaskError(ValueError):
    """An unknown task name, or task options that do not fit together."""


@dataclass
class EvalOptions:
    """Everything ``lctx eval`` was asked for, parsed (see :func:`lctx.runner.make_options`)."""

    models: list[str]
    ropes: list[str]
    tasks: list[str]
    lengths: list[int]
    samples: int | None = None
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    stride: int | None = None
    last_k: int = 256
    data: str | None = None
    text_field: str = "text"
    dataset: str | None = None
    needle: str | None = None
    question: str | None = None
    out: Path = Path("results")
    force: bool = False
    shard: tuple[int, int] | None = None
    dtype: str = "auto"
    device: str = "auto"
    attn: str = "sdpa"
    device_map: str | None = None
    train_len: int | None = None
    target_len: int | None = None
    seed: int = 0
    max_new_tokens: int | None = None
    data_dir: Path | None = None  # task data files (LongBench: one <task>.jsonl per task)
    chat_template: bool = False  # wrap generation prompts in the tokenizer's chat template
    task_args: dict[str, str] = field(default_factory=dict)  # --task-arg KEY=VALUE, read by the tasks that know KEY
    max_memory: int | None = None  # bytes: skip cells whose up-front estimate (lctx.memory) is larger
    prefill_chunk: int | None = None  # generation tasks: feed prompts through the KV cache this many tokens at once
    argv: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Cell:
    """One result: a task at one length (and depth) for one model and resolved RoPE variant."""

    length: int
    depth: float | None = None

    @property
    def label(self) -> str:
        from lctx.results import format_length

        return format_length(self.length) + ("" if self.depth is None else f" @{self.depth:g}")


@dataclass
class Outcome:
    """What a task computed for one cell: aggregated metrics, per-sample values, and extras for the record."""

    metrics: dict[str, Any]
    samples: list[dict[str, Any]]
    data: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # printed next to the cell's result (e.g. documents skipped)


@dataclass
class Context:
    """What a task runs against: the loaded model, its training length, the options and the corpus."""

    loaded: Any  # lctx.models.Loaded
    train_len: int
    options: EvalOptions
    corpus: Any  # lctx.data.Corpus
    cache: dict[str, Any] = field(default_factory=dict)  # per-model scratch space for tasks (tokenized data)

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


Report = Callable[[float], None]  # advance the progress display by this much estimated cost


def forward_cost(length: int) -> float:
    """Rough relative cost of one forward over ``length`` tokens (linear layers plus quadratic attention)."""
    return length * (1 + length / 2048)


class Task:
    """Base class; see the module docstring."""

    name: ClassVar[str]
    description: ClassVar[str]
    metric: ClassVar[str]  # headline metric in tables
    higher_is_better: ClassVar[bool] = False
    uses_depths: ClassVar[bool] = False
    uses_corpus: ClassVar[bool] = False  # reads --data/--dataset (or the default corpus)
    default_samples: ClassVar[int] = 1
    memory_profile: ClassVar[str] = "prefill"  # what it keeps of the last layer: lctx.memory.PROFILES

    def samples(self, options: EvalOptions) -> int:
        return options.samples or self.default_samples

    def memory_batch(self, options: EvalOptions) -> int:
        """Sequences of a cell's length in memory at once (for the up-front memory estimate)."""
        return 1

    def config(self, options: EvalOptions) -> dict[str, Any]:
        """Task options that change results; part of each cell's key."""
        return {"samples": self.samples(options)}

    def validate(self, options: EvalOptions) -> None:
        """Raise :class:`TaskError` for options this task cannot use (before any model is loaded)."""

    def cells(self, options: EvalOptions) -> list[Cell]:
        if self.uses_depths:
            return [Cell(length, depth) for length in options.lengths for depth in options.depths]
        return [Cell(length) for length in options.lengths]

    def groups(self, spec: RopeSpec, cells: list[Cell], options: EvalOptions) -> list[list[Cell]]:
        """Units of work; by default one per cell."""
        return [[cell] for cell in cells]

    def cost(self, cells: list[Cell], options: EvalOptions) -> float:
        """Estimated cost of computing ``cells`` as one group (for progress ETA and shard balance)."""
        return sum(forward_cost(c.length) for c in cells) * self.samples(options)

    def check(self, ctx: Context, cells: list[Cell]) -> None:
        """Fail early (DataError/TaskError) when the data cannot serve these cells."""

    def run(self, ctx: Context, spec: RopeSpec, cells: list[Cell], report: Report) -> dict[Cell, Outcome]:
        raise NotImplementedError


TASKS: dict[str, Task] = {}
FAMILIES: dict[str, tuple[Callable[[str], list[Task]], str]] = {}  # prefix -> (member name -> tasks, help)


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: instantiate the task and add it to the registry under ``cls.name``."""
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    TASKS[cls.name] = cls()
    return cls


def register_family(prefix: str, expand: Callable[[str], list[Task]], members: str) -> None:
    """Register tasks named ``prefix:member``; ``expand`` raises TaskError naming the valid members."""
    if prefix in FAMILIES or prefix in TASKS:
        raise ValueError(f"task family {prefix!r} is registered twice")
    FAMILIES[prefix] = (expand, members)


def task_names() -> list[str]:
    """Every task name, families as ``prefix:<members>``, for help texts and error messages."""
    return sorted(TASKS) + [f"{prefix}:<{members}>" for prefix, (_, members) in sorted(FAMILIES.items())]


def expand(name: str) -> list[Task]:
    """The tasks a name stands for: one registered task, or the members of a family."""
    if name in TASKS:
        return [TASKS[name]]
    prefix, sep, member = name.partition(":")
    if sep and prefix in FAMILIES:
        if not member:
            raise TaskError(f"task {name!r} names no member of {prefix!r}: use {prefix}:<{FAMILIES[prefix][1]}>")
        return FAMILIES[prefix][0](member)
    raise TaskError(f"unknown task {name!r}. Valid tasks: {', '.join(task_names())}")


def get(name: str) -> Task:
    tasks = expand(name)
    if len(tasks) != 1:
        raise TaskError(f"task {name!r} stands for {len(tasks)} tasks; name one of them")
    return tasks[0]


def parse_tasks(values: str | list[str]) -> list[Task]:
    """Comma-separated and/or repeated task names, in order, without repeats.

    Within one comma-separated list, a name that is neither a task nor ``family:member`` continues the family
    before it: ``lm-eval:hellaswag,arc_easy`` is ``lm-eval:hellaswag,lm-eval:arc_easy``.
    """
    items = [values] if isinstance(values, str) else list(values)
    tasks: list[Task] = []
    for item in items:
        family = None
        for name in item.split(","):
            name = name.strip()
            if not name:
                raise TaskError(f"empty task name in {item!r}. Valid tasks: {', '.join(task_names())}")
            prefix, sep, _ = name.partition(":")
            if sep and prefix in FAMILIES:
                family = prefix
            elif family and name not in TASKS:
                name = f"{family}:{name}"
            for task in expand(name):
                if task not in tasks:
                    tasks.append(task)
    if not tasks:
        raise TaskError(f"no task given. Valid tasks: {', '.join(task_names())}")
    return tasks


# Importing the task modules registers them.
# (lm_eval_bridge also registers the lm-eval model `lctx`)
from lctx.evals import lm_eval_bridge, longbench, niah, passkey, ppl, synthetic  # noqa: E402, F401
