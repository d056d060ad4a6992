"""Computing one unit of work into records: the one code path every executor runs (in this process, on a Ray
worker, on a torchrun rank).

:func:`compute` answers a unit's cells with a loaded model and hands each finished cell's record to a
:class:`Sink`, which decides what to do with it: the local runner appends it to the store and prints it at once;
a Ray worker collects the records and returns them to the driver, the only writer. A unit of several cells that
fails is retried cell by cell, so one length that does not fit does not take the shorter ones with it; an
out-of-memory error is recorded as ``oom``, any other exception and any metric that is not a finite number (a
diverged loss) as ``error``, so the next run computes the cell again.
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lctx import models, provenance, results
from lctx.engine import Engine
from lctx.evals import Cell, Outcome
from lctx.meter import Meter, free_memory, is_oom
from lctx.options import RunOptions
from lctx.plan import Unit


class NonFiniteMetric(ArithmeticError):
    """A task returned NaN or an infinite loss: the cell is an error, to be computed again."""


@dataclass
class Done:
    """A finished cell: its record, and notes to print next to it (documents skipped, …) that are not recorded."""

    cell: Cell
    record: dict[str, Any]
    notes: list[str] = field(default_factory=list)


class Sink(Protocol):
    """Where :func:`compute` reports: progress in estimated cost, finished cells, and messages."""

    def advance(self, cost: float) -> None: ...

    def done(self, unit: Unit, done: Done) -> None: ...

    def note(self, text: str) -> None: ...


def non_finite(metrics: dict[str, Any]) -> str | None:
    """The first NaN metric, or the first infinite loss (an NLL), as ``name=value``; None when all are fine."""
    for name, value in metrics.items():
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and "nll" in name)):
            return f"{name}={value}"
    return None


def make_record(unit: Unit, cell: Cell, *, run_id: str, status: str, meter: Meter, device: torch.device | str,
                outcome: Outcome | None = None, error: BaseException | str | None = None, trace: str | None = None,
                over_budget: bool = False) -> dict[str, Any]:
    """A cell's record (the schema of :mod:`lctx.results`); ``error`` an exception or its ``Type: message``."""
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}"
    record = {
        "schema": results.SCHEMA_VERSION,
        "run_id": run_id,
        **unit.record_base(cell),
        "rope_input": unit.spec_input,
        "device": str(device),
        "status": status,
        "error": None if error is None else error[:4000],
        "metrics": outcome.metrics if outcome else {},
        "samples": outcome.samples if outcome else [],
        "data": outcome.data if outcome else None,
        "seconds": round(meter.seconds, 4),
        "peak_memory_bytes": meter.peak_bytes,
        "memory_kind": meter.kind,
        "process_peak_bytes": meter.process_peak_bytes,
        "memory_estimate_bytes": None if unit.estimate is None else unit.estimate.total,
        **(outcome.extra if outcome else {}),
        "finished_at": provenance.now(),
        "lctx_version": provenance.lctx_version(),
    }
    if trace:
        record["traceback"] = trace
    if over_budget:
        record["over_budget"] = True
    return record


def compute(engine: Engine, unit: Unit, cells: list[Cell], device: torch.device, run_id: str, sink: Sink) -> None:
    """Compute ``cells`` of ``unit`` together, each finished cell to ``sink``; on failure of several cells, retry
    them one by one. KeyboardInterrupt passes through; every other exception becomes the cell's record."""
    meter = Meter(device)
    done_cost = 0.0

    def report(cost: float) -> None:
        nonlocal done_cost
        done_cost += cost
        sink.advance(cost)

    try:
        with meter:
            outcomes = unit.task.run(engine, unit.spec, cells, report)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of a cell is recorded, the run goes on
        oom = is_oom(err)
        trace = "".join(traceback.format_exception(err)[-6:])[-4000:]
        err.__traceback__ = None  # its frames hold activations: free them before going on
        free_memory(device)
        sink.advance(-done_cost)
        if len(cells) > 1:
            sink.note(f"{'out of memory' if oom else 'failed'} computing {unit.label(cells)} together; retrying "
                      "one cell at a time")
            for cell in cells:
                compute(engine, unit, [cell], device, run_id, sink)
            return
        record = make_record(unit, cells[0], run_id=run_id, status="oom" if oom else "error", meter=meter,
                             device=device, error=err, trace=None if oom else trace)
        sink.done(unit, Done(cells[0], record))
        sink.advance(unit.task.cost(cells))
        return
    for cell in cells:
        outcome = outcomes[cell]
        bad = non_finite(outcome.metrics)
        if bad is not None:
            error = NonFiniteMetric(f"non-finite {bad}: the model diverged under this variant; the cell will be "
                                    "computed again")
            sink.done(unit, Done(cell, make_record(unit, cell, run_id=run_id, status="error", meter=meter,
                                                   device=device, error=error)))
            continue
        record = make_record(unit, cell, run_id=run_id, status="ok", meter=meter, device=device, outcome=outcome)
        sink.done(unit, Done(cell, record, list(outcome.notes)))
    sink.advance(unit.task.cost(cells) - done_cost)


def check(engine: Engine, units: list[Unit]) -> None:
    """Check the data of ``units`` (DataError/TaskError) before computing; ``engine`` may hold a tokenizer only."""
    for task in dict.fromkeys(u.task for u in units):
        cells = sorted({c for u in units if u.task is task for c in u.cells}, key=lambda c: (c.length, c.depth or 0))
        task.check(engine, cells)


@dataclass
class Model:
    """A loaded model with its engine, and how long loading took."""

    loaded: models.Loaded
    engine: Engine
    seconds: float


def load(options: RunOptions, model: str, train_len: int, *, device: str | None = None,
         device_map: str | None = None) -> Model:
    """Load ``model`` as the run's options say (``device``/``device_map`` override them: a rank's or a worker's)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    loaded = models.load(model, dtype=options.dtype, device=device or options.device, attn=options.attn,
                         train_len=train_len, device_map=device_map or options.device_map,
                         trust_remote_code=options.trust_remote_code)
    engine = Engine.from_loaded(loaded, train_len, prefill_chunk=options.prefill_chunk,
                                batch_size=options.batch_size)
    return Model(loaded, engine, time.perf_counter() - t0)


def metric_text(unit: Unit, metrics: dict[str, Any]) -> str:
    """The headline metric of a cell as the tables show it, with its interval."""
    from lctx.view.tables import format_number, interval_text

    metric = unit.task.metrics[0] if unit.task.metrics else None
    if metric is None or metrics.get(metric.name) is None:
        return ""
    value = metrics[metric.name]
    text = f"{metric.name} {format_number(value, metric)}"
    if metric.interval and all(metrics.get(k) is not None for k in metric.interval):
        from lctx.view.frame import Value

        low, high = (metrics[k] for k in metric.interval)
        text += f" {interval_text(Value(value, 'ok', low, high), metric)}"
    return text

