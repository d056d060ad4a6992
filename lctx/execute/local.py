"""Running a plan in this process: load each model once, compute its units with progress, record every cell as it
completes, and end with the tables and the report.

Order of work: per model (loaded once, only if it has cells left), per unit, each computed by
:func:`lctx.execute.compute.compute` (the code path every executor shares: a unit under a timer and a memory
meter, ``oom``/``error`` records, a failed unit retried cell by cell, non-finite metrics as errors). Ctrl-C or
SIGTERM keeps every record written so far (the manifest says ``interrupted``); the same command resumes.

:class:`Runner` is also the frame of the other executors: planning, the store's lock, the manifest, the memory
check and the end (tables, report) are here; :meth:`Runner.compute_units` is what an executor replaces
(:mod:`lctx.execute.cluster` sends units to Ray workers and records what they return). Under a launcher
(:mod:`lctx.execute.launch`) each rank runs its shard and rank 0 writes the tables after a barrier.

Exit status: 0 when every cell is ok or oom, 1 when any cell of this run errored, 130 when interrupted.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
import time
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
from lctx.execute import compute, launch
from lctx.execute.compute import Done
from lctx.meter import Meter, free_memory
from lctx.options import RunOptions
from lctx.plan import HINT_CHUNK, Plan, Unit, pending, plan
from lctx.spec import format_length

EXIT_OK, EXIT_ERRORS, EXIT_INTERRUPTED = 0, 1, 130


class MemoryBudgetExceeded(MemoryError):
    """A cell's up-front memory estimate is over --max-memory (recorded as oom, not run)."""


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
    lead: bool = True  # this process wrote the tables and the report (under a launcher: rank 0 only)


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
        "models": [{"model": m, "train_len": n, **({"train_rope": the_plan.train_ropes[m]}
                                                    if m in the_plan.train_ropes else {})}
                   for m, n in the_plan.train_lens.items()],
        "tasks": [task.spec for task in the_plan.tasks], "options": opts,
        "records": str(results.Store(options.out, options.shard).path),
    }


PROGRESS_COLUMNS = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                    TextColumn("{task.fields[cells]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())


class Runner:
    def __init__(self, options: RunOptions, console: Console | None = None, launched: launch.Launch | None = None):
        self.options = options
        self.console = console or Console()
        self.store = results.Store(options.out, options.shard)
        self.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.summary = Summary()
        self.launched = launched
        self.device: torch.device | None = None  # where the last model ran (the manifest's device)
        self.manifest_extra: dict[str, Any] = {}  # what an executor adds to the manifest

    # -- what compute() reports, and the records it makes --

    def keep(self, record: dict[str, Any]) -> None:
        """Append a record to this run's records file and count it."""
        self.store.append(record)
        status = record["status"]
        setattr(self.summary, status, getattr(self.summary, status) + 1)

    def done(self, unit: Unit, done: Done) -> None:
        """A finished cell: recorded, then printed."""
        record = done.record
        self.keep(record)
        where = f"{escape(unit.model)} · {escape(unit.label([done.cell]))}"
        if record["status"] != "ok":
            status = record["status"]
            first_line = (record["error"] or "").splitlines()[0][:300] if record["error"] else ""
            self.console.print(f"[{'yellow' if status == 'oom' else 'red'}]✗ {status.upper()}[/] {where}: "
                               f"{escape(first_line)}")
            return
        shared = record.get("shared_forward")
        note = f", one forward for {','.join(map(format_length, shared))}" if shared else ""
        self.console.print(f"[green]✓[/] {where}: {escape(compute.metric_text(unit, record['metrics']))}  "
                           f"[dim]({record['seconds']:.1f} s, {memory.format_size(record['peak_memory_bytes'])} "
                           f"peak{note})[/]" + "".join(f"\n  [yellow]note:[/] {escape(text)}" for text in done.notes))

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]{escape(text)}[/]")

    # -- the run --

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
            status = "failed"
            try:
                with _sigterm_as_interrupt():
                    todo = self._memory_check(todo)
                    self.compute_units(todo, checked)
                status = "finished"
            except KeyboardInterrupt:
                self.summary.interrupted = True
                status = "interrupted"
            finally:
                meta["device"] = provenance.device_info(self.device)
                meta.update(self.manifest_extra)
                meta.update(status=status, finished_at=provenance.now(), cells=asdict(self.summary))
                with contextlib.suppress(OSError):  # a full disk must not hide the error that stopped the run
                    results.write_json(manifest_path, meta)
        lead = self._wait_for_the_others()
        self._finish(the_plan, manifest_path, lead)
        code = EXIT_INTERRUPTED if self.summary.interrupted else EXIT_ERRORS if self.summary.error else EXIT_OK
        return RunResult(the_plan, self.summary, manifest_path, code, lead)

    def _wait_for_the_others(self) -> bool:
        """Under a launcher: wait at the barrier for every rank's records (not when interrupted: the others may
        never come). True when this process writes the tables and the report."""
        if self.launched is None:
            return True
        if not self.summary.interrupted:
            self.console.print(f"rank {self.launched.rank}/{self.launched.world}: waiting for the other ranks")
            try:
                with _sigterm_as_interrupt():
                    launch.barrier()
            except KeyboardInterrupt:
                self.summary.interrupted = True
        return self.launched.lead

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

    def record_device(self) -> torch.device:
        """The device named in records of cells not run (over the memory budget)."""
        return models.resolve_device(self.options.device)

    def available_memory(self) -> tuple[int | None, str]:
        """Memory free where cells will run, and where that is (for the memory check's message)."""
        device = models.resolve_device(self.options.device)
        return memory.available_memory(device), device.type

    def _memory_check(self, todo: list[Unit]) -> list[Unit]:
        """Print the largest up-front estimate; record units over --max-memory as oom (not run) and drop them."""
        known = [u for u in todo if u.estimate is not None]
        if not known:
            return todo
        largest = max(known, key=lambda u: u.estimate.total)
        budget = self.options.max_memory
        available, where_available = self.available_memory()
        where = escape(largest.label([max(largest.cells, key=lambda c: c.length)]))
        limit = (f"--max-memory {memory.format_size(budget)}" if budget else
                 f"{memory.format_size(available)} available on {where_available}" if available else "")
        self.console.print(f"memory estimate: largest cell {where} {largest.estimate.describe()}"
                           + (f"; {limit}" if limit else ""))
        if not budget and available and largest.estimate.total > available:
            self.console.print("[yellow]warning:[/] the largest cells may not fit in memory; "
                               "--max-memory skips cells over a budget instead of attempting them")
        if not budget:
            return todo
        device = self.record_device()
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
                self.keep(compute.make_record(unit, cell, run_id=self.run_id, status="oom", meter=Meter(device),
                                              device=device, error=error, over_budget=True))
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
            compute.check(Engine(None, tokenizer, units[0].train_len), units)
            checked.add(model)
        return checked

    def progress(self) -> Progress:
        """The run's progress display: one bar over every cell, with its ETA (off when not on a terminal)."""
        return Progress(*PROGRESS_COLUMNS, console=self.console, disable=not self.console.is_terminal)

    def compute_units(self, todo: list[Unit], checked: set[str]) -> None:
        """Compute every unit of ``todo``, recording each cell as it finishes: here, one model at a time."""
        if not todo:
            return
        with self.progress() as progress:
            overall = progress.add_task("all cells", total=sum(u.cost() for u in todo), cells="")
            n_cells = sum(len(u.cells) for u in todo)
            finished = 0
            for model in dict.fromkeys(u.model for u in todo):
                units = [u for u in todo if u.model == model]
                progress.update(overall, description=f"loading {model}")
                try:
                    with self.console.status(f"loading {model}…"):
                        ready = compute.load(self.options, model, units[0].train_len)
                except models.ModelLoadError as err:  # its cells are errors; the other models still run
                    cpu = torch.device("cpu")
                    for unit in units:
                        for cell in unit.cells:
                            self.keep(compute.make_record(unit, cell, run_id=self.run_id, status="error",
                                                          meter=Meter(cpu), device=cpu, error=err))
                    self.console.print(f"[red]✗ ERROR[/] {escape(model)}: {escape(str(err))} "
                                       f"({sum(len(u.cells) for u in units)} cells recorded as errors)")
                    finished += sum(len(u.cells) for u in units)
                    continue
                self.device = device = ready.loaded.device
                trained_under = f", trained under {ready.loaded.train_rope}" if ready.loaded.train_rope else ""
                self.console.print(f"loaded {model} on {device} ({str(ready.loaded.dtype).removeprefix('torch.')}, "
                                   f"{self.options.attn}, training length {ready.loaded.train_len}{trained_under}) in "
                                   f"{ready.seconds:.1f} s")
                if model not in checked:
                    compute.check(ready.engine, units)
                for unit in units:
                    progress.update(overall, description=f"{model}", cells=f"{finished}/{n_cells} cells")
                    current = progress.add_task(unit.label(), total=unit.cost(), cells="")
                    compute.compute(ready.engine, unit, unit.cells, device, self.run_id,
                                    _Report(self, progress, (current, overall)))
                    progress.remove_task(current)
                    finished += len(unit.cells)
                progress.update(overall, cells=f"{finished}/{n_cells} cells")
                del ready
                free_memory(device)

    def _finish(self, the_plan: Plan, manifest_path: Path, lead: bool = True) -> None:
        """Print this run's tables and the totals; rewrite table.md and the report from every record (the lead
        only: under a launcher, rank 0 after every rank's records are in)."""
        s = self.summary
        out = Path(self.options.out)
        every = view.newest(self.store.read())
        if lead:
            keys = the_plan.all_keys if self.launched else the_plan.keys
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
        if every and lead:
            results.write_text(out / "table.md", view.markdown(every))
            lines.append(f"Table: {out / 'table.md'}  (reprint: lctx results {out})")
            if self.options.report and not s.interrupted:
                written = view.write(every, out / "report", title=out.resolve().name, source=str(out))
                lines.append(f"Report: {written.index}  ({len(written.tables)} tables, {len(written.figures)} "
                             "figure files; lctx report for more)")
        elif not lead:
            lines.append("Tables and report: written by rank 0")
        self.console.print("\n".join(lines), highlight=False)
        if self.store.skipped:
            self.console.print(f"[yellow]warning:[/] {escape(self.store.skipped.describe())}")


class _Report:
    """The local runner as compute()'s sink: progress on the unit's bar and the overall one."""

    def __init__(self, runner: Runner, progress: Progress, bars: tuple[Any, ...]):
        self.runner, self.progress, self.bars = runner, progress, bars

    def advance(self, cost: float) -> None:
        for bar in self.bars:
            self.progress.advance(bar, cost)

    def done(self, unit: Unit, done: Done) -> None:
        self.runner.done(unit, done)

    def note(self, text: str) -> None:
        self.runner.note(text)


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
    """Run ``lctx eval``; raises one of :data:`lctx.execute.USAGE_ERRORS` for a bad command, before any work.

    Under a launcher (``torchrun``, ``accelerate launch``) this process runs its rank's shard; with
    ``executor="ray"`` the cells are computed by a Ray cluster's workers (:mod:`lctx.execute.cluster`)."""
    launched = launch.from_env()
    if launched is not None:
        options = launch.apply(launched, options)
        with launch.group(launched):
            return Runner(options, console, launched).run()
    if options.executor == "ray":
        from lctx.execute import cluster

        return cluster.RayRunner(options, console).run()
    return Runner(options, console).run()
