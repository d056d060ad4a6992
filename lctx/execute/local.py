"""Running a plan in this process: load each model once, compute its units with progress, record every cell as it
completes, and end with the tables and the report.

Order of work: per model (loaded once, only if it has cells left), per unit. Every unit runs under a timer and a
memory meter; an out-of-memory error is recorded as status ``oom`` and any other exception as ``error``, and the
run goes on. A unit of several cells that fails is retried cell by cell, so one length that does not fit does not
take the shorter ones with it. A cell whose metrics are not finite numbers (a diverged loss) is an ``error``, so the
next run computes it again. Ctrl-C or SIGTERM keeps every record written so far (the manifest says
``interrupted``); the same command resumes.

Exit status: 0 when every cell is ok or oom, 1 when any cell of this run errored, 130 when interrupted.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import signal
import sys
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lctx import evals, memory, models, provenance, results, view
from lctx.engine import Engine
from lctx.evals import Cell, Outcome
from lctx.meter import Meter, free_memory, is_oom
from lctx.options import RunOptions
from lctx.plan import HINT_CHUNK, Plan, Unit, pending, plan
from lctx.spec import format_length

EXIT_OK, EXIT_ERRORS, EXIT_INTERRUPTED = 0, 1, 130


class MemoryBudgetExceeded(MemoryError):
    """A cell's up-front memory estimate is over --max-memory (recorded as oom, not run)."""


class NonFiniteMetric(ArithmeticError):
    """A task returned NaN or an infinite loss: the cell is an error, to be computed again."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C: records are kept and the manifest says interrupted."""


@dataclass
class Summary:
    planned: int = 0  # cells of this shard
    skipped: int = 0
    ok: int = 0
    oom: int = 0
    error: int = 0
    interrupted: bool = False

    @property
    def computed(self) -> int:
        return self.ok + self.oom + self.error


@dataclass
class RunResult:
    """What a run planned and did: sweeps report on exactly its cells without planning again."""

    plan: Plan
    summary: Summary
    manifest: Path
    code: int


def manifest(options: RunOptions, run_id: str, the_plan: Plan) -> dict[str, Any]:
    opts = asdict(options)
    opts["out"] = str(options.out)
    argv = options.argv or sys.argv
    return {
        "run_id": run_id, "command": shlex.join(argv), "argv": argv, "cwd": str(Path.cwd()),
        "started_at": provenance.now(), "lctx_version": provenance.lctx_version(), "git": provenance.git_revision(),
        "packages": provenance.package_versions(), "device": provenance.device_info(None),
        "dtype": the_plan.units[0].base["dtype"] if the_plan.units else options.dtype, "attn": options.attn,
        "device_map": options.device_map, "shard": list(options.shard) if options.shard else None,
        "torch_initial_seed": torch.initial_seed(),
        "models": [{"model": m, "train_len": n} for m, n in the_plan.train_lens.items()],
        "tasks": [task.spec for task in the_plan.tasks], "options": opts,
        "records": str(results.Store(options.out, options.shard).path),
    }


def non_finite(metrics: dict[str, Any]) -> str | None:
    """The first NaN metric, or the first infinite loss (an NLL), as ``name=value``; None when all are fine."""
    for name, value in metrics.items():
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and "nll" in name)):
            return f"{name}={value}"
    return None


def _metric_text(unit: Unit, metrics: dict[str, Any]) -> str:
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


class Runner:
    def __init__(self, options: RunOptions, console: Console | None = None):
        self.options = options
        self.console = console or Console()
        self.store = results.Store(options.out, options.shard)
        self.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.summary = Summary()

    def record(self, unit: Unit, cell: Cell, *, status: str, meter: Meter, outcome: Outcome | None = None,
               error: BaseException | None = None, device: torch.device, trace: str | None = None,
               over_budget: bool = False) -> dict[str, Any]:
        record = {
            "schema": results.SCHEMA_VERSION,
            "run_id": self.run_id,
            **unit.record_base(cell),
            "rope_input": unit.spec_input,
            "device": str(device),
            "status": status,
            "error": None if error is None else f"{type(error).__name__}: {error}"[:4000],
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
        self.store.append(record)
        setattr(self.summary, status, getattr(self.summary, status) + 1)
        return record

    def execute(self, engine: Engine, unit: Unit, cells: list[Cell], device: torch.device, advance) -> None:
        """Compute ``cells`` of ``unit`` together; on failure of several cells, retry them one by one."""
        meter = Meter(device)
        done_cost = 0.0

        def report(cost: float) -> None:
            nonlocal done_cost
            done_cost += cost
            advance(cost)

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
            advance(-done_cost)
            if len(cells) > 1:
                self.console.print(f"[yellow]{'out of memory' if oom else 'failed'} computing "
                                   f"{escape(unit.label(cells))} together; retrying one cell at a time[/]")
                for cell in cells:
                    self.execute(engine, unit, [cell], device, advance)
                return
            self._failed(unit, cells[0], err, oom, meter, device, trace)
            advance(unit.task.cost(cells))
            return
        for cell in cells:
            outcome = outcomes[cell]
            bad = non_finite(outcome.metrics)
            if bad is not None:
                self._failed(unit, cell, NonFiniteMetric(f"non-finite {bad}: the model diverged under this "
                                                          "variant; the cell will be computed again"),
                             False, meter, device, None)
                continue
            self.record(unit, cell, status="ok", meter=meter, outcome=outcome, device=device)
            shared = outcome.extra.get("shared_forward")
            note = f", one forward for {','.join(map(format_length, shared))}" if shared else ""
            self.console.print(f"[green]✓[/] {escape(unit.model)} · {escape(unit.label([cell]))}: "
                               f"{escape(_metric_text(unit, outcome.metrics))}  "
                               f"[dim]({meter.seconds:.1f} s, {memory.format_size(meter.peak_bytes)} peak{note})[/]"
                               + "".join(f"\n  [yellow]note:[/] {escape(text)}" for text in outcome.notes))
        advance(unit.task.cost(cells) - done_cost)

    def _failed(self, unit: Unit, cell: Cell, err: BaseException, oom: bool, meter: Meter, device: torch.device,
                trace: str | None) -> None:
        status = "oom" if oom else "error"
        self.record(unit, cell, status=status, meter=meter, error=err, device=device, trace=None if oom else trace)
        first_line = str(err).splitlines()[0][:200] if str(err) else ""
        self.console.print(f"[{'yellow' if oom else 'red'}]✗ {status.upper()}[/] {escape(unit.model)} · "
                           f"{escape(unit.label([cell]))}: {type(err).__name__}: {escape(first_line)}")

    def run(self) -> RunResult:
        options = self.options
        the_plan = plan(options)
        self.store.check()
        todo, skipped = pending(the_plan, self._done(the_plan))
        checked = self._preflight(todo)  # data checked with the tokenizer alone, before anything is written
        with self.store.writing():
            todo, skipped = pending(the_plan, self._done(the_plan))  # again, now that no other writer can add records
            self.summary.planned = sum(len(u.cells) for u in the_plan.units)
            self.summary.skipped = skipped
            shard = f" (shard {options.shard[0]}/{options.shard[1]})" if options.shard else ""
            self.console.print(
                f"lctx eval{shard}: {self.summary.planned} cells"
                + (f" of {the_plan.total_cells}" if options.shard else "")
                + f", {skipped} already recorded in {options.out}, {self.summary.planned - skipped} to compute"
                + (" [dim](--force: recomputing all)[/]" if options.force else ""))
            manifest_path = Path(options.out) / f"manifest-{self.run_id}.json"
            meta = manifest(options, self.run_id, the_plan)
            results.write_json(manifest_path, {**meta, "status": "running"})
            device, status = None, "failed"
            try:
                with _sigterm_as_interrupt():
                    todo = self._memory_check(todo)
                    device = self._run_units(todo, checked)
                status = "finished"
            except KeyboardInterrupt:
                self.summary.interrupted = True
                status = "interrupted"
            finally:
                meta["device"] = provenance.device_info(device)
                meta.update(status=status, finished_at=provenance.now(), cells=asdict(self.summary))
                with contextlib.suppress(OSError):  # a full disk must not hide the error that stopped the run
                    results.write_json(manifest_path, meta)
        self._finish(the_plan, manifest_path)
        code = EXIT_INTERRUPTED if self.summary.interrupted else EXIT_ERRORS if self.summary.error else EXIT_OK
        return RunResult(the_plan, self.summary, manifest_path, code)

    def _done(self, the_plan: Plan) -> set[str]:
        """Keys of the cells recorded as done (none with --force). Records written before fingerprints count as
        the model's current files."""
        if self.options.force:
            return set()
        records = [evals.upgrade(r) for r in self.store.read()]
        for record in records:
            if "model_fingerprint" not in record:
                record["model_fingerprint"] = the_plan.fingerprints.get(record.get("model"))
        return results.completed(results.newest(records))

    def _memory_check(self, todo: list[Unit]) -> list[Unit]:
        """Print the largest up-front estimate; record units over --max-memory as oom (not run) and drop them."""
        known = [u for u in todo if u.estimate is not None]
        if not known:
            return todo
        largest = max(known, key=lambda u: u.estimate.total)
        budget = self.options.max_memory
        device = models.resolve_device(self.options.device)
        available = memory.available_memory(device)
        where = escape(largest.label([max(largest.cells, key=lambda c: c.length)]))
        limit = (f"--max-memory {memory.format_size(budget)}" if budget else
                 f"{memory.format_size(available)} available on {device.type}" if available else "")
        self.console.print(f"memory estimate: largest cell {where} {largest.estimate.describe()}"
                           + (f"; {limit}" if limit else ""))
        if not budget and available and largest.estimate.total > available:
            self.console.print("[yellow]warning:[/] the largest cells may not fit in memory; "
                               "--max-memory skips cells over a budget instead of attempting them")
        if not budget:
            return todo
        kept = []
        for unit in todo:
            if unit.estimate is None or unit.estimate.total <= budget:
                kept.append(unit)
                continue
            hint = unit.chunked_estimate is not None and unit.chunked_estimate.total <= budget
            error = MemoryBudgetExceeded(f"estimated {memory.format_size(unit.estimate.total)} > --max-memory "
                                         f"{memory.format_size(budget)}; not run"
                                         + (f" (with --prefill-chunk {format_length(HINT_CHUNK)}: "
                                            f"{memory.format_size(unit.chunked_estimate.total)})" if hint else ""))
            for cell in unit.cells:
                self.record(unit, cell, status="oom", meter=Meter(device), error=error, device=device,
                            over_budget=True)
            self.console.print(f"[yellow]✗ OOM[/] {escape(unit.model)} · {escape(unit.label())}: {error} "
                               f"({unit.estimate.describe()})")
        return kept

    def _preflight(self, todo: list[Unit]) -> set[str]:
        """Check the data of every model's pending cells with its tokenizer alone, before loading weights.

        Returns the models checked; the others (tokenizer not loadable on its own) are checked once loaded.
        """
        checked = set()
        for model in dict.fromkeys(u.model for u in todo):
            tokenizer = models.load_tokenizer(model)
            if tokenizer is None:
                continue
            units = [u for u in todo if u.model == model]
            self._check(Engine(None, tokenizer, units[0].train_len), units)
            checked.add(model)
        return checked

    @staticmethod
    def _check(engine: Engine, units: list[Unit]) -> None:
        for task in dict.fromkeys(u.task for u in units):
            cells = sorted({c for u in units if u.task is task for c in u.cells},
                           key=lambda c: (c.length, c.depth or 0))
            task.check(engine, cells)

    def _run_units(self, todo: list[Unit], checked: set[str]) -> torch.device | None:
        if not todo:
            return None
        total = sum(u.cost() for u in todo)
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[cells]}"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn())
        device = None
        with Progress(*columns, console=self.console, disable=not self.console.is_terminal) as progress:
            overall = progress.add_task("all cells", total=total, cells="")
            n_cells = sum(len(u.cells) for u in todo)
            finished = 0
            for model in dict.fromkeys(u.model for u in todo):
                units = [u for u in todo if u.model == model]
                progress.update(overall, description=f"loading {model}")
                try:
                    loaded = self._load(model, units[0].train_len)
                except models.ModelLoadError as err:  # its cells are errors; the other models still run
                    cpu = torch.device("cpu")
                    for unit in units:
                        for cell in unit.cells:
                            self.record(unit, cell, status="error", meter=Meter(cpu), error=err, device=cpu)
                    self.console.print(f"[red]✗ ERROR[/] {escape(model)}: {escape(str(err))} "
                                       f"({sum(len(u.cells) for u in units)} cells recorded as errors)")
                    finished += sum(len(u.cells) for u in units)
                    continue
                device = loaded.device
                engine = Engine.from_loaded(loaded, units[0].train_len, prefill_chunk=self.options.prefill_chunk,
                                            batch_size=self.options.batch_size)
                if model not in checked:
                    self._check(engine, units)
                for unit in units:
                    progress.update(overall, description=f"{model}", cells=f"{finished}/{n_cells} cells")
                    current = progress.add_task(unit.label(), total=unit.cost(), cells="")

                    def advance(cost: float, current=current) -> None:
                        progress.advance(current, cost)
                        progress.advance(overall, cost)

                    self.execute(engine, unit, unit.cells, device, advance)
                    progress.remove_task(current)
                    finished += len(unit.cells)
                progress.update(overall, cells=f"{finished}/{n_cells} cells")
                del engine, loaded
                free_memory(device)
        return device

    def _load(self, model: str, train_len: int) -> models.Loaded:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        with self.console.status(f"loading {model}…"):
            t0 = time.perf_counter()
            loaded = models.load(model, dtype=self.options.dtype, device=self.options.device,
                                 attn=self.options.attn, train_len=train_len, device_map=self.options.device_map,
                                 trust_remote_code=self.options.trust_remote_code)
        self.console.print(f"loaded {model} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')}, "
                           f"{self.options.attn}, training length {loaded.train_len}) in "
                           f"{time.perf_counter() - t0:.1f} s")
        return loaded

    def _finish(self, the_plan: Plan, manifest_path: Path) -> None:
        """Print this run's tables and the totals; rewrite table.md and the report from every record."""
        s = self.summary
        out = Path(self.options.out)
        every = view.newest(self.store.read())
        keys = the_plan.keys
        mine = [r for r in every if results.cell_key(r) in keys]
        for table in view.console(mine):
            self.console.print(table)
        if s.interrupted:
            self.console.print(f"[yellow]Interrupted.[/] {s.computed} cells were recorded before the interrupt "
                               f"({s.ok} ok, {s.oom} oom, {s.error} error); re-run the same command to resume.")
        else:
            self.console.print(f"Done: {s.computed} cells computed ({s.ok} ok, {s.oom} oom, {s.error} error), "
                               f"{s.skipped} already recorded.")
        lines = [f"Records: {self.store.path}", f"Manifest: {manifest_path}"]
        if every:
            results.write_text(out / "table.md", view.markdown(every))
            lines.append(f"Table: {out / 'table.md'}  (reprint: lctx results {out})")
            if self.options.report and not s.interrupted:
                written = view.write(every, out / "report", title=out.resolve().name, source=str(out))
                lines.append(f"Report: {written.index}  ({len(written.tables)} tables, {len(written.figures)} "
                             "figure files; lctx report for more)")
        self.console.print("\n".join(lines), highlight=False)
        if self.store.skipped:
            self.console.print(f"[yellow]warning:[/] {escape(self.store.skipped.describe())}")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread for the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(options: RunOptions, console: Console | None = None) -> RunResult:
    """Run ``lctx eval``; raises one of :data:`lctx.execute.USAGE_ERRORS` for a bad command, before any work."""
    return Runner(options, console).run()
