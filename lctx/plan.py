"""Planning a run: the cells of models × variants × tasks × lengths, grouped into units of work, sharded, and
priced in memory up front — everything that can be refused is refused here, before any weights load.

A **unit** is cells of one (model, task, variant) computed together: perplexity computes every length of a
length-independent variant in one forward (:meth:`lctx.evals.Task.groups`). Shards take units longest first to
the least loaded shard, deterministically, so every process of a sharded run agrees on the split.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lctx import evals, memory, models, patches, results
from lctx.evals import Cell, Task
from lctx.options import RunOptions
from lctx.patches import RopeSpec
from lctx.patches.arch import training_length
from lctx.spec import format_value

HINT_CHUNK = 4096  # the --prefill-chunk an over-budget generation cell's message suggests


class PlanError(ValueError):
    """Options that do not make sense together, found before anything runs."""


@dataclass
class Unit:
    """Cells of one (model, task, variant) computed together."""

    model: str
    task: Task
    spec: RopeSpec  # resolved
    spec_input: str
    cells: list[Cell]
    train_len: int
    base: dict[str, Any] = field(repr=False, default_factory=dict)  # key fields shared by its records
    estimate: memory.Estimate | None = None  # peak memory of its longest cell (lctx.memory)
    chunked_estimate: memory.Estimate | None = None  # the same with --prefill-chunk HINT_CHUNK (generation tasks)

    def record_base(self, cell: Cell) -> dict[str, Any]:
        return {**self.base, "length": cell.length, "depth": cell.depth}

    def key(self, cell: Cell) -> str:
        return results.cell_key(self.record_base(cell))

    def cost(self) -> float:
        return self.task.cost(self.cells)

    def label(self, cells: list[Cell] | None = None) -> str:
        cells = cells or self.cells
        where = ",".join(c.label for c in cells) if len(cells) <= 4 else f"{len(cells)} cells"
        return f"{self.task.name} · {self.spec_input} · {where}"


@dataclass
class Plan:
    units: list[Unit]  # this shard's units, full (nothing skipped yet)
    total_cells: int  # cells of the whole command (all shards)
    train_lens: dict[str, int]
    tasks: list[Task]
    all_keys: set[str]  # every cell of the command (all shards): what its report covers
    fingerprints: dict[str, str | None]  # model -> lctx.models.fingerprint
    train_ropes: dict[str, str] = field(default_factory=dict)  # model -> variant lctx trained it under, if any

    @property
    def keys(self) -> set[str]:
        """This shard's cells."""
        return {unit.key(cell) for unit in self.units for cell in unit.cells}


def dtype_name(options: RunOptions) -> str:
    """The dtype cells run in; only ``auto`` depends on the device (a Ray driver plans for devices it has not)."""
    device = models.resolve_device(options.device) if options.dtype == "auto" else torch.device("cpu")
    return str(models.resolve_dtype(options.dtype, device)).removeprefix("torch.")


def spec_text(spec: RopeSpec) -> str:
    """A spec as the user typed it (only the parameters given)."""
    return ":".join([spec.name, *(f"{k}={format_value(v)}" for k, v in spec.params)])


def plan(options: RunOptions) -> Plan:
    """Every unit of the command, assigned to shards; raises a usage error before anything is loaded."""
    if not options.lengths:
        raise PlanError("no length given")
    tasks = evals.resolve(options.tasks, options.task_defaults)
    for task in tasks:
        task.check_lengths(options.lengths)
    specs = patches.parse_list(options.ropes)
    dtype = dtype_name(options)
    dtype_bytes = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    units: list[Unit] = []
    train_lens: dict[str, int] = {}
    fingerprints: dict[str, str | None] = {}
    train_ropes: dict[str, str] = {}
    for model in options.models:
        config = models.load_config(model, options.trust_remote_code)
        trained_under = models.training_rope(config)
        if trained_under:
            train_ropes[model] = trained_under
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        train_len = int(options.train_len) if options.train_len else training_length(text)
        train_lens[model] = train_len
        fingerprints[model] = models.fingerprint(model)
        resolved: dict[str, tuple[RopeSpec, str]] = {}
        for spec in specs:
            full = spec.resolve(train_len, options.target_len)
            resolved.setdefault(full.canonical, (full, spec_text(spec)))
        for full, _ in resolved.values():  # a variant the model cannot take is refused before weights load
            patches.check(config, full, train_len, options.target_len)
        for task in tasks:
            cells = task.cells(options.lengths)
            for full, typed in resolved.values():
                base = {"model": model, "model_fingerprint": fingerprints[model], "rope": full.canonical,
                        "task": task.name, "task_spec": task.spec,
                        "config": task.identity(), "train_len": train_len, "dtype": dtype, "attn": options.attn}
                for group in task.groups(full, cells):
                    unit = Unit(model, task, full, typed, group, train_len, base)
                    unit.estimate = _estimate(config, unit, options, dtype_bytes, options.prefill_chunk)
                    if task.memory_profile == "prefill" and not options.prefill_chunk:
                        unit.chunked_estimate = _estimate(config, unit, options, dtype_bytes, HINT_CHUNK)
                    units.append(unit)
    every = {unit.key(cell) for unit in units for cell in unit.cells}
    if options.shard is not None:
        units = shard_units(units, options.shard)
    return Plan(units, len(every), train_lens, tasks, every, fingerprints, train_ropes)


def _estimate(config: Any, unit: Unit, options: RunOptions, dtype_bytes: int,
              prefill_chunk: int | None) -> memory.Estimate | None:
    """The unit's peak memory from the config alone; None for a config lctx.memory cannot read."""
    batch = unit.task.memory_batch() * (options.batch_size if unit.task.memory_profile == "prefill" else 1)
    try:
        return memory.estimate(config, max(c.length for c in unit.cells), dtype_bytes=dtype_bytes,
                               profile=unit.task.memory_profile, attention=options.attn,
                               chunked=unit.spec.variant.kind == "attention", batch=batch,
                               prefill_chunk=prefill_chunk)
    except (TypeError, ValueError, AttributeError):
        return None


def shard_units(units: list[Unit], shard: tuple[int, int]) -> list[Unit]:
    """This shard's units: longest first to the least loaded shard (deterministic, same in every process)."""
    index, count = shard
    loads = [0.0] * count
    order = sorted(range(len(units)), key=lambda i: (-units[i].cost(), i))
    assigned: dict[int, int] = {}
    for i in order:
        target = min(range(count), key=lambda s: (loads[s], s))
        loads[target] += units[i].cost()
        assigned[i] = target
    return [unit for i, unit in enumerate(units) if assigned[i] == index]  # the plan's order within the shard


def pending(the_plan: Plan, done: set[str]) -> tuple[list[Unit], int]:
    """The units still to compute (cells already recorded dropped, the rest regrouped) and how many were skipped."""
    out: list[Unit] = []
    skipped = 0
    for unit in the_plan.units:
        cells = [c for c in unit.cells if unit.key(c) not in done]
        skipped += len(unit.cells) - len(cells)
        if not cells:
            continue
        groups = unit.task.groups(unit.spec, cells) if len(cells) != len(unit.cells) else [cells]
        out += [replace(unit, cells=group) for group in groups]
    return out, skipped
