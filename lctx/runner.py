"""``lctx eval``: plan the cells, skip finished ones, run the rest with progress, record each as it completes.

Order of work: per model (loaded once, only if it has cells left), per task, per RoPE variant, per unit of
work (:meth:`lctx.evals.Task.groups`). Every unit runs under a timer and a memory meter; an out-of-memory
error (``torch.OutOfMemoryError``, a RuntimeError saying "out of memory"/"can't allocate memory", or
``MemoryError``) is recorded as status ``oom`` and any other exception as ``error``, and the run goes on.
A unit of several cells that fails is retried cell by cell, so one length that does not fit does not take
the shorter ones with it. Ctrl-C keeps every record written so far; the same command resumes.

Exit status: 0 when every cell is ok or oom, 1 when any cell of this run errored, 130 when interrupted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field, replace
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

from lctx import data, evals, memory, models, patches, results
from lctx.evals import Cell, Context, EvalOptions, Outcome, Task
from lctx.patches import RopeSpec
from lctx.patches.arch import UnsupportedModelError, training_length
from lctx.results import format_length

EXIT_OK, EXIT_ERRORS, EXIT_INTERRUPTED = 0, 1, 130


class EvalError(ValueError):
    """Options that do not make sense together, found before anything runs."""


# Errors that mean "the command is wrong" (printed as one line, exit status 2), not "a cell failed".
USAGE_ERRORS = (EvalError, evals.TaskError, patches.SpecError, data.DataError, models.ModelLoadError, memory.SizeError,
                UnsupportedModelError)

_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kKmM]?)\s*$")
LENGTH_FORMS = "an integer number of tokens (4096) or a number with a k or m suffix (×1024, ×1048576): 1k, 1.5k, 12k"


def parse_length(text: str | int) -> int:
    """``4096``, ``4k`` (4096), ``1.5k`` (1536), ``1m`` (1048576); at least 2 tokens."""
    if isinstance(text, int):
        value = text
    else:
        match = _LENGTH.match(text)
        if not match:
            raise ValueError(f"invalid length {text!r}: use {LENGTH_FORMS}")
        number, suffix = float(match.group(1)), match.group(2).lower()
        scaled = number * {"": 1, "k": 1024, "m": 1024 * 1024}[suffix]
        if scaled != int(scaled):
            raise ValueError(f"invalid length {text!r}: {scaled:g} is not a whole number of tokens; use {LENGTH_FORMS}")
        value = int(scaled)
    if value < 2:
        raise ValueError(f"invalid length {text!r}: a length must be at least 2 tokens")
    return value


def parse_lengths(values: str | list[str]) -> list[int]:
    """Comma-separated and/or repeated lengths, sorted, without repeats."""
    items = [values] if isinstance(values, str) else list(values)
    lengths = [parse_length(part) for item in items for part in item.split(",") if part.strip()]
    if not lengths:
        raise ValueError(f"no length given: use {LENGTH_FORMS}")
    return sorted(set(lengths))


def parse_depths(values: str | list[str]) -> list[float]:
    items = [values] if isinstance(values, str) else list(values)
    depths = []
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            try:
                depth = float(part)
            except ValueError:
                raise ValueError(f"invalid depth {part.strip()!r}: use numbers in [0, 1], e.g. 0,0.25,0.5,0.75,1") \
                    from None
            if not 0 <= depth <= 1:
                raise ValueError(f"invalid depth {part.strip()!r}: depths are fractions in [0, 1] "
                                 "(0 = start of the context, 1 = end)")
            depths.append(depth)
    if not depths:
        raise ValueError("no depth given: use numbers in [0, 1], e.g. 0,0.25,0.5,0.75,1")
    return sorted(set(depths))


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``i/n`` with 0 ≤ i < n."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"invalid shard {text!r}: use i/n with 0 ≤ i < n, e.g. 0/4 (the first of four)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise ValueError(f"invalid shard {text!r}: the index must be between 0 and {max(count - 1, 0)} "
                         f"for {count} shards (i/n with 0 ≤ i < n)")
    return index, count


def parse_task_args(values: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` items (repeatable ``--task-arg``) as a dict; a repeated key keeps its last value."""
    parsed: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"invalid task argument {item!r}: use KEY=VALUE, e.g. --task-arg threshold=85.6")
        parsed[key.strip()] = value.strip()
    return parsed


# ---- measurement -------------------------------------------------------------------------------------------


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class Meter:
    """Wall time and peak memory of a block: CUDA max allocated, or peak RSS growth sampled on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = device
        self.interval = interval
        self.seconds = 0.0
        self.peak_bytes: int | None = None
        self.process_peak_bytes: int | None = None  # CPU: the whole process's peak RSS
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_growth"

    def __enter__(self) -> Meter:
        self._stop = threading.Event()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _free_memory(self.device)
            self._start_thread()
        self._t0 = time.perf_counter()
        return self

    def _start_thread(self) -> None:
        try:
            import psutil
        except ImportError:  # coarse fallback: ru_maxrss only grows past its previous maximum
            import resource

            self._rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            process = psutil.Process()
            self._rss = lambda: process.memory_info().rss
        self._base = self._peak = self._rss()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True, name="lctx-rss")
        self._thread.start()

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss())
            self.peak_bytes = int(self._peak - self._base)
            self.process_peak_bytes = int(self._peak)
        self.seconds = time.perf_counter() - self._t0


def _free_memory(device: torch.device | None) -> None:
    """Collect garbage and hand freed memory back (CUDA cache; glibc heap), so the next cell's peak is its own."""
    import gc

    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    """glibc keeps freed blocks mapped, which would hide a cell's RSS growth; ask it to return them."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---- planning ----------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """Cells of one (model, task, variant) computed together."""

    model: str
    task: Task
    spec: RopeSpec  # resolved
    spec_input: str
    cells: list[Cell]
    train_len: int
    config: dict[str, Any]
    base: dict[str, Any] = field(repr=False, default_factory=dict)  # key fields shared by its records
    estimate: memory.Estimate | None = None  # peak memory of its longest cell (lctx.memory)
    chunked_estimate: memory.Estimate | None = None  # the same with --prefill-chunk HINT_CHUNK (generation tasks)

    def record_base(self, cell: Cell) -> dict[str, Any]:
        return {**self.base, "length": cell.length, "depth": cell.depth}

    def key(self, cell: Cell) -> str:
        return results.cell_key(self.record_base(cell))

    def cost(self, options: EvalOptions) -> float:
        return self.task.cost(self.cells, options)

    def label(self, cells: list[Cell] | None = None) -> str:
        cells = cells or self.cells
        where = ",".join(c.label for c in cells) if len(cells) <= 4 else f"{len(cells)} cells"
        return f"{self.task.name} · {self.spec_input} · {where}"


@dataclass
class Plan:
    units: list[Unit]  # this shard's units, full (nothing skipped yet)
    total_cells: int  # cells of the whole command (all shards)
    train_lens: dict[str, int]


def _dtype_name(options: EvalOptions) -> str:
    return str(models.resolve_dtype(options.dtype, models.resolve_device(options.device))).removeprefix("torch.")


def plan(options: EvalOptions) -> Plan:
    """Every unit of the command, assigned to shards; raises USAGE_ERRORS before anything is loaded."""
    tasks = evals.parse_tasks(options.tasks)
    specs = patches.parse_list(options.ropes)
    if not options.lengths:
        raise EvalError(f"no length given: use {LENGTH_FORMS}")
    for task in tasks:
        task.validate(options)
    if any(t.uses_corpus for t in tasks):
        data.open_corpus(options.data, options.dataset, options.text_field)  # fail early on a bad --data
    dtype = _dtype_name(options)
    dtype_bytes = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    units: list[Unit] = []
    train_lens: dict[str, int] = {}
    for model in options.models:
        config = models.load_config(model)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        train_len = int(options.train_len) if options.train_len else training_length(text)
        train_lens[model] = train_len
        resolved: dict[str, tuple[RopeSpec, str]] = {}
        for spec in specs:
            full = spec.resolve(train_len, options.target_len)
            resolved.setdefault(full.canonical, (full, _spec_text(spec)))
        for task in tasks:
            task_config = task.config(options)
            cells = task.cells(options)
            for full, typed in resolved.values():
                base = {"model": model, "rope": full.canonical, "task": task.name, "train_len": train_len,
                        "dtype": dtype, "attn": options.attn, "config": task_config}
                for group in task.groups(full, cells, options):
                    unit = Unit(model, task, full, typed, group, train_len, task_config, base)
                    unit.estimate = _estimate(config, unit, options, dtype_bytes)
                    if task.memory_profile == "prefill" and not options.prefill_chunk:
                        unit.chunked_estimate = _estimate(config, unit, replace(options, prefill_chunk=HINT_CHUNK),
                                                          dtype_bytes)
                    units.append(unit)
    total = sum(len(u.cells) for u in units)
    if options.shard is not None:
        units = shard_units(units, options)
    return Plan(units, total, train_lens)


HINT_CHUNK = 4096  # the --prefill-chunk an over-budget generation cell's message suggests


def _estimate(config: Any, unit: Unit, options: EvalOptions, dtype_bytes: int) -> memory.Estimate | None:
    """The unit's peak memory from the config alone; None for a config lctx.memory cannot read."""
    try:
        return memory.estimate(config, max(c.length for c in unit.cells), dtype_bytes=dtype_bytes,
                               profile=unit.task.memory_profile, attention=options.attn,
                               chunked=unit.spec.variant.kind == "attention", batch=unit.task.memory_batch(options),
                               prefill_chunk=options.prefill_chunk)
    except (TypeError, ValueError, AttributeError):
        return None


def _spec_text(spec: RopeSpec) -> str:
    return ":".join([spec.name, *(f"{k}={patches.format_value(v)}" for k, v in spec.params)])


def shard_units(units: list[Unit], options: EvalOptions) -> list[Unit]:
    """This shard's units: longest first to the least loaded shard (deterministic, same in every process)."""
    index, count = options.shard
    loads = [0.0] * count
    mine = []
    order = sorted(range(len(units)), key=lambda i: (-units[i].cost(options), i))
    assigned: dict[int, int] = {}
    for i in order:
        target = min(range(count), key=lambda s: (loads[s], s))
        loads[target] += units[i].cost(options)
        assigned[i] = target
    for i, unit in enumerate(units):  # keep the plan's order within the shard
        if assigned[i] == index:
            mine.append(unit)
    return mine


# ---- manifest ----------------------------------------------------------------------------------------------


def lctx_version() -> str:
    try:
        return importlib.metadata.version("lctx")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def git_revision() -> dict[str, Any] | None:
    """The checkout's revision when first asked (a run's start): a long process keeps the code it imported even
    if the checkout moves on while it runs."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"revision": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "accelerate", "datasets", "numpy", "pandas",
                 "safetensors", "lm-eval"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(device: torch.device | None) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "host": platform.node(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(type="cuda", name=props.name, total_memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    device_count=torch.cuda.device_count())
    else:
        name = platform.processor()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        info.update(type="cpu", name=name)
    return info


def manifest(options: EvalOptions, run_id: str, the_plan: Plan, device: torch.device | None) -> dict[str, Any]:
    opts = asdict(options)
    opts["out"] = str(options.out)
    return {
        "run_id": run_id,
        "command": shlex.join(options.argv or sys.argv),
        "argv": options.argv or sys.argv,
        "cwd": os.getcwd(),
        "started_at": _now(),
        "lctx_version": lctx_version(),
        "git": git_revision(),
        "packages": package_versions(),
        "device": device_info(device),
        "dtype": _dtype_name(options),
        "attn": options.attn,
        "device_map": options.device_map,
        "seed": options.seed,
        "torch_initial_seed": torch.initial_seed(),
        "shard": list(options.shard) if options.shard else None,
        "models": [{"model": m, "train_len": n} for m, n in the_plan.train_lens.items()],
        "options": opts,
        "records": str(results.Store(options.out, options.shard).path),
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")  # orders --force rewrites


# ---- running -----------------------------------------------------------------------------------------------


class MemoryBudgetExceeded(MemoryError):
    """A cell's up-front memory estimate is over --max-memory (recorded as oom, not run)."""


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


def _metric_text(task: Task, metrics: dict[str, Any]) -> str:
    value = metrics.get(task.metric)
    if value is None:
        return ""
    if task.metric == "accuracy":
        return f"accuracy {100 * value:.0f}% [{100 * metrics['ci_low']:.0f}–{100 * metrics['ci_high']:.0f}]"
    return f"{task.metric} {value:.3f}"


class Runner:
    def __init__(self, options: EvalOptions, console: Console | None = None):
        self.options = options
        self.console = console or Console()
        self.store = results.Store(options.out, options.shard)
        self.run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
        self.summary = Summary()
        self._corpus: data.Corpus | None = None

    @property
    def corpus(self) -> data.Corpus:
        if self._corpus is None:
            self._corpus = data.open_corpus(self.options.data, self.options.dataset, self.options.text_field)
        return self._corpus

    def record(self, unit: Unit, cell: Cell, *, status: str, meter: Meter, outcome: Outcome | None = None,
               error: BaseException | None = None, device: torch.device,
               trace: str | None = None, over_budget: bool = False) -> dict[str, Any]:
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
            "finished_at": _now(),
            "lctx_version": lctx_version(),
        }
        if trace:
            record["traceback"] = trace
        if over_budget:
            record["over_budget"] = True
        self.store.append(record)
        setattr(self.summary, status, getattr(self.summary, status) + 1)
        return record

    def execute(self, ctx: Context, unit: Unit, cells: list[Cell], advance) -> None:
        """Compute ``cells`` of ``unit`` together; on failure of several cells, retry them one by one."""
        device = ctx.loaded.device
        meter = Meter(device)
        done_cost = 0.0

        def report(cost: float) -> None:
            nonlocal done_cost
            done_cost += cost
            advance(cost)

        try:
            with meter:
                outcomes = unit.task.run(ctx, unit.spec, cells, report)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - any failure of a cell is recorded, the run goes on
            oom = is_oom(err)
            trace = "".join(traceback.format_exception(err)[-6:])[-4000:]
            err.__traceback__ = None  # its frames hold activations: free them before going on
            _free_memory(device)
            advance(-done_cost)
            if len(cells) > 1:
                self.console.print(f"[yellow]{'out of memory' if oom else 'failed'} computing "
                                   f"{escape(unit.label(cells))} together; retrying one cell at a time[/]")
                for cell in cells:
                    self.execute(ctx, unit, [cell], advance)
                return
            status = "oom" if oom else "error"
            (cell,) = cells
            self.record(unit, cell, status=status, meter=meter, error=err, device=device,
                        trace=None if oom else trace)
            first_line = str(err).splitlines()[0][:200] if str(err) else ""
            self.console.print(f"[{'yellow' if oom else 'red'}]✗ {status.upper()}[/] {escape(unit.model)} · "
                               f"{escape(unit.label([cell]))}: {type(err).__name__}: {escape(first_line)}")
            advance(unit.task.cost([cell], self.options))
            return
        for cell in cells:
            outcome = outcomes[cell]
            self.record(unit, cell, status="ok", meter=meter, outcome=outcome, device=device)
            shared = outcome.extra.get("shared_forward")
            note = f", one forward for {','.join(map(format_length, shared))}" if shared else ""
            self.console.print(f"[green]✓[/] {escape(unit.model)} · {escape(unit.label([cell]))}: "
                               f"{_metric_text(unit.task, outcome.metrics)}  "
                               f"[dim]({meter.seconds:.1f} s, {memory.format_size(meter.peak_bytes)} peak{note})[/]"
                               + "".join(f"\n  [yellow]note:[/] {escape(text)}" for text in outcome.notes))
        advance(unit.task.cost(cells, self.options) - done_cost)

    def run(self) -> int:
        options = self.options
        the_plan = plan(options)
        done = set() if options.force else self.store.completed()
        pending: list[Unit] = []
        for unit in the_plan.units:
            self.summary.planned += len(unit.cells)
            cells = [c for c in unit.cells if unit.key(c) not in done]
            self.summary.skipped += len(unit.cells) - len(cells)
            if not cells:
                continue
            if len(cells) != len(unit.cells):
                regrouped = unit.task.groups(unit.spec, cells, options)
            else:
                regrouped = [cells]
            for group in regrouped:
                pending.append(replace(unit, cells=group))
        shard = f" (shard {options.shard[0]}/{options.shard[1]})" if options.shard else ""
        self.console.print(
            f"lctx eval{shard}: {self.summary.planned} cells"
            + (f" of {the_plan.total_cells}" if options.shard else "")
            + f", {self.summary.skipped} already recorded in {options.out}, "
            f"{self.summary.planned - self.summary.skipped} to compute"
            + (" [dim](--force: recomputing all)[/]" if options.force else "")
        )
        checked = self._preflight(pending)
        pending = self._memory_check(pending)
        manifest_path = Path(options.out) / f"manifest-{self.run_id}.json"
        meta = manifest(options, self.run_id, the_plan, None)
        results.write_json(manifest_path, {**meta, "status": "running"})
        device, status = None, "failed"
        try:
            device = self._run_units(pending, checked)
            status = "finished"
        except KeyboardInterrupt:
            self.summary.interrupted = True
            status = "interrupted"
        finally:
            meta["device"] = device_info(device)
            meta.update(status=status, finished_at=_now(), cells=asdict(self.summary))
            results.write_json(manifest_path, meta)
        self._finish(the_plan, manifest_path)
        if self.summary.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_ERRORS if self.summary.error else EXIT_OK

    def _memory_check(self, pending: list[Unit]) -> list[Unit]:
        """Print the largest up-front estimate; record units over --max-memory as oom (not run) and drop them."""
        known = [u for u in pending if u.estimate is not None]
        if not known:
            return pending
        largest = max(known, key=lambda u: u.estimate.total)
        budget = self.options.max_memory
        device = models.resolve_device(self.options.device)
        available = memory.available_memory(device)
        where = f"{escape(largest.label([max(largest.cells, key=lambda c: c.length)]))}"
        limit = (f"--max-memory {memory.format_size(budget)}" if budget else
                 f"{memory.format_size(available)} available on {device.type}" if available else "")
        self.console.print(f"memory estimate: largest cell {where} {largest.estimate.describe()}"
                           + (f"; {limit}" if limit else ""))
        if not budget and available and largest.estimate.total > available:
            self.console.print("[yellow]warning:[/] the largest cells may not fit in memory; "
                               "--max-memory skips cells over a budget instead of attempting them")
        if not budget:
            return pending
        kept = []
        for unit in pending:
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

    def _preflight(self, pending: list[Unit]) -> set[str]:
        """Check the data of every model's pending cells with its tokenizer alone, before loading weights.

        Returns the models checked; the others (tokenizer not loadable on its own) are checked once loaded.
        """
        checked = set()
        if not pending:
            return checked
        corpus = self.corpus if any(u.task.uses_corpus for u in pending) else None
        for model in dict.fromkeys(u.model for u in pending):
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(models._source(model)[0])
            except Exception:  # noqa: BLE001 - best effort; the check runs again after loading
                continue
            units = [u for u in pending if u.model == model]
            light = models.Loaded(model=None, tokenizer=tokenizer, name=model, train_len=units[0].train_len,
                                  device=torch.device("cpu"), dtype=torch.float32)
            self._check(Context(loaded=light, train_len=units[0].train_len, options=self.options, corpus=corpus),
                        units)
            checked.add(model)
        return checked

    @staticmethod
    def _check(ctx: Context, units: list[Unit]) -> None:
        for task in dict.fromkeys(u.task for u in units):
            cells = sorted({c for u in units if u.task is task for c in u.cells},
                           key=lambda c: (c.length, c.depth or 0))
            task.check(ctx, cells)

    def _run_units(self, pending: list[Unit], checked: set[str]) -> torch.device | None:
        if not pending:
            return None
        options = self.options
        corpus = self.corpus if any(u.task.uses_corpus for u in pending) else None
        total = sum(u.cost(options) for u in pending)
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[cells]}"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn())
        device = None
        with Progress(*columns, console=self.console, disable=not self.console.is_terminal) as progress:
            overall = progress.add_task("all cells", total=total, cells="")
            n_cells = sum(len(u.cells) for u in pending)
            finished = 0
            for model in dict.fromkeys(u.model for u in pending):
                units = [u for u in pending if u.model == model]
                progress.update(overall, description=f"loading {model}")
                loaded = self._load(model, units[0].train_len)
                device = loaded.device
                ctx = Context(loaded=loaded, train_len=units[0].train_len, options=options, corpus=corpus)
                if model not in checked:
                    self._check(ctx, units)
                for unit in units:
                    progress.update(overall, description=f"{model}", cells=f"{finished}/{n_cells} cells")
                    current = progress.add_task(unit.label(), total=unit.cost(options), cells="")

                    def advance(cost: float, current=current) -> None:
                        progress.advance(current, cost)
                        progress.advance(overall, cost)

                    self.execute(ctx, unit, unit.cells, advance)
                    progress.remove_task(current)
                    finished += len(unit.cells)
                progress.update(overall, cells=f"{finished}/{n_cells} cells")
                del ctx, loaded
                _free_memory(device)
        return device

    def _load(self, model: str, train_len: int):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        with self.console.status(f"loading {model}…"):
            t0 = time.perf_counter()
            loaded = models.load(model, dtype=self.options.dtype, device=self.options.device,
                                 attn=self.options.attn, train_len=train_len, device_map=self.options.device_map)
        self.console.print(f"loaded {model} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')}, "
                           f"{self.options.attn}, training length {loaded.train_len}) in "
                           f"{time.perf_counter() - t0:.1f} s")
        return loaded

    def _finish(self, the_plan: Plan, manifest_path: Path) -> None:
        s = self.summary
        keys = {u.key(c) for u in the_plan.units for c in u.cells}
        latest = self.store.latest()
        mine = [r for k, r in latest.items() if k in keys]
        table_path = Path(self.options.out) / "table.md"
        every = list(latest.values())
        if every:
            table_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = table_path.with_name(f".table.md.tmp{os.getpid()}")
            tmp.write_text(results.to_markdown(results.tables(every)), encoding="utf-8")
            tmp.replace(table_path)
        for table in results.rich_tables(results.tables(mine)):
            self.console.print(table)
        if s.interrupted:
            self.console.print(f"[yellow]Interrupted.[/] {s.computed} cells were recorded before the interrupt "
                               f"({s.ok} ok, {s.oom} oom, {s.error} error); re-run the same command to resume.")
        else:
            self.console.print(f"Done: {s.computed} cells computed ({s.ok} ok, {s.oom} oom, {s.error} error), "
                               f"{s.skipped} already recorded.")
        self.console.print(f"Records: {self.store.path}\nManifest: {manifest_path}\n"
                           + (f"Table: {table_path}  (reprint: lctx results {self.options.out})" if every else ""))
        if self.store.bad_lines:
            self.console.print(f"[yellow]{self.store.bad_lines} unreadable line(s) in the records were ignored[/]")


def run(options: EvalOptions, console: Console | None = None) -> int:
    """Run ``lctx eval``; returns the exit status. Raises one of :data:`USAGE_ERRORS` for a bad command."""
    return Runner(options, console).run()


def show_results(root: str | Path, console: Console | None = None, *, task: str | None = None,
                 model: str | None = None, metric: str | None = None, by_depth: bool = False,
                 csv: str | Path | None = None) -> int:
    """``lctx results``: print comparison tables of the records under ``root``."""
    console = console or Console()
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"results directory {str(root)!r} does not exist (lctx eval writes to --out, default "
                        "results/)")
    store = results.Store(root)
    records = store.records()
    if task:
        records = [r for r in records if r.get("task") == task]
    if model:
        records = [r for r in records if r.get("model") == model]
    if not records:
        console.print(f"no records in {root}" + (" matching the filters" if task or model else ""))
        return 1
    if metric and metric not in results.metric_names(records):
        raise EvalError(f"unknown metric {metric!r}; these records have: {', '.join(results.metric_names(records))}")
    if csv:
        results.frame(records).to_csv(csv, index=False)
        console.print(f"wrote {len(records)} rows to {csv}")
    for table in results.rich_tables(results.tables(records, metric=metric, by_depth=by_depth)):
        console.print(table)
    if metric is None:  # LongBench records also as category and overall averages
        for table in results.rich_tables(evals.longbench.category_tables(records)):
            console.print(table)
        evals.synthetic.print_effective_lengths(records, console)  # RULER's effective length, synthetic tasks only
    return 0
