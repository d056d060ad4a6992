"""Computing a plan on a Ray cluster (``--executor ray``): workers keep a model loaded and compute units; the
driver, this process, is the only writer of the records.

**Workers.** A worker is a Ray actor (:class:`LctxWorker`, ``ray::LctxWorker`` in ``ps``) bound to one model: it
loads the model once and computes the units it is sent with :func:`lctx.execute.compute.compute`, the code path
of every executor, returning each cell's record (a plain dict) instead of writing it. Models are served in the
plan's order: while a model has units waiting, up to as many workers as the cluster holds (and as it has units)
compute them; once its queue is empty, its idle workers are stopped and the next model's start.

**Resources** come from lctx's memory estimate (:mod:`lctx.memory`, weights included) of a model's largest unit,
times :data:`HEADROOM`. On GPUs, a worker asks for the share of one GPU its cells need (small models pack, up
to :data:`MAX_PACK` workers per GPU), or for several whole GPUs when the estimate is larger than one GPU, and
then loads the model with ``device_map="auto"`` over them. GPU memory is read from one GPU of the cluster
(assumed alike). On CPUs, a worker asks for one CPU and the estimate plus :data:`PROCESS_BYTES` of Ray's
``memory`` resource, so a node is not given more models than fit in its RAM.

**Failures.** A worker that dies (killed, its node lost) is restarted by Ray and its unit run again, up to
:data:`RAY_RETRIES` times (``max_restarts``/``max_task_retries``); when Ray gives up, the unit's cells are
recorded as ``error`` (``oom`` when Ray's memory monitor killed it) and the next run computes them again. The
driver records a cell once: a result for a cell already recorded in this run is dropped. A driver that dies
loses only the units in flight: records are appended as each unit's results arrive, the workers die with their
driver, and the next run resumes from the store as any run does.

**Reachability.** Records need no shared filesystem (they travel back to the driver), but every worker loads the
model and reads the task data itself, so models and data must be reachable from every node (same paths, a shared
filesystem, or hub ids with the hub or ``HF_HOME`` available), and lctx installed on every node. Workers run in
the driver's working directory when it exists on their node, so relative paths work on a shared filesystem.
"""

from __future__ import annotations

import logging
import math
import os
import platform
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from lctx import memory, provenance, results
from lctx.execute import compute
from lctx.execute.compute import Done
from lctx.execute.local import Runner, RunResult
from lctx.meter import Meter
from lctx.options import RunOptions
from lctx.plan import PlanError, Unit, plan

INSTALL = "pip install 'lctx[ray]'"
RAY_RETRIES = 2  # Ray restarts a dead worker, and runs its unit again, this many times
HEADROOM = 1.2  # a worker asks for its largest unit's estimate times this
PROCESS_BYTES = 2**30  # CPU workers: the interpreter, torch and the tokenizer, on top of the estimate
MAX_PACK = 8  # at most this many workers share one GPU


def import_ray():
    """The ray module, or a usage error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise PlanError(f"--executor ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


@dataclass(frozen=True)
class Resources:
    """What one worker asks Ray for, and how it loads its model."""

    num_cpus: float = 1
    num_gpus: float = 0
    memory: int | None = None  # bytes of Ray's memory resource (CPU workers)
    device_map: str | None = None  # "auto": the model spans the worker's GPUs

    def ray_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory:
            out["memory"] = self.memory
        return out

    def capacity(self, cluster: dict[str, float]) -> int:
        """How many such workers the cluster's total resources hold at once."""
        counts = [math.floor(cluster.get("CPU", 0) / self.num_cpus + 1e-9)]
        if self.num_gpus:
            counts.append(math.floor(cluster.get("GPU", 0) / self.num_gpus + 1e-9))
        if self.memory:
            counts.append(math.floor(cluster.get("memory", 0) / self.memory))
        return max(0, min(counts))

    def describe(self) -> str:
        parts = [f"{self.num_cpus:g} CPU"]
        if self.num_gpus:
            parts.append(f"{self.num_gpus:.3g} GPU")
        if self.memory:
            parts.append(f"{memory.format_size(self.memory)} memory")
        return ", ".join(parts) + (f", device_map={self.device_map}" if self.device_map else "")


def resources(estimate: int | None, gpu_memory: int | None, device_map: str | None = None) -> Resources:
    """A worker's resources for a model whose largest unit is estimated at ``estimate`` bytes (None: unknown),
    on GPUs of ``gpu_memory`` bytes (None: a CPU worker). ``device_map`` is the run's ``--device-map``."""
    if gpu_memory is None:
        return Resources(memory=None if estimate is None else int(estimate * HEADROOM) + PROCESS_BYTES)
    if estimate is None:
        return Resources(num_gpus=1, device_map=device_map)
    share = estimate * HEADROOM / gpu_memory
    if share > 1:
        return Resources(num_gpus=math.ceil(share), device_map="auto")
    if device_map:  # asked to spread the model: over one whole GPU at least
        return Resources(num_gpus=1, device_map=device_map)
    return Resources(num_gpus=1 / min(MAX_PACK, max(1, math.floor(1 / share))))


def worker_options(options: RunOptions, cluster: dict[str, float]) -> RunOptions:
    """The run's options with the workers' device and dtype, decided by the cluster's resources, not by this
    machine's (a driver without a GPU plans bf16 cells on CUDA workers, as one GPU process would)."""
    gpus = cluster.get("GPU", 0)
    if options.device.startswith("cuda:"):
        raise PlanError(f"--device {options.device} with --executor ray: Ray gives each worker its GPUs; use "
                        "--device auto or cuda")
    if options.device not in ("auto", "cpu", "cuda"):
        raise PlanError(f"--device {options.device} with --executor ray: use auto, cpu or cuda")
    if options.device == "cuda" and not gpus:
        raise PlanError("--device cuda but the Ray cluster has no GPU")
    use_gpu = options.device == "cuda" or (options.device == "auto" and gpus > 0)
    dtype = options.dtype if options.dtype != "auto" else "bfloat16" if use_gpu else "float32"
    return replace(options, device="cuda" if use_gpu else "cpu", dtype=dtype)


def gpu_memory() -> int:
    """Total memory of the GPU this Ray task was given."""
    return int(torch.cuda.get_device_properties(0).total_memory)


class Collect:
    """compute()'s sink on a worker: finished cells and messages, in order, to return to the driver."""

    def __init__(self) -> None:
        self.events: list[Done | str] = []

    def advance(self, cost: float) -> None:
        """Progress is counted by the driver, per unit."""

    def done(self, unit: Unit, done: Done) -> None:
        self.events.append(done)

    def note(self, text: str) -> None:
        self.events.append(text)


class LctxWorker:
    """A Ray actor computing units of one model, loaded once (wrapped by ``ray.remote`` when the run starts)."""

    def __init__(self, options: RunOptions, cwd: str, device_map: str | None):
        if Path(cwd).is_dir():  # relative model and data paths, on a shared filesystem
            os.chdir(cwd)
        self.options = options
        self.device_map = device_map
        self.model: compute.Model | None = None
        self.name: str | None = None
        self.units: dict[str, Unit] = {}  # cell key -> its unit, as this worker plans the model

    def load(self, model: str, train_len: int) -> dict[str, Any]:
        """Load ``model`` (if not loaded yet); where and how long, for the driver's log and manifest."""
        held = self._held(model, train_len)
        return {"pid": os.getpid(), "host": platform.node(), "device": str(held.loaded.device),
                "seconds": round(held.seconds, 2), "lctx_version": provenance.lctx_version(),
                "git": provenance.git_revision(), "device_info": provenance.device_info(held.loaded.device)}

    def compute(self, model: str, train_len: int, keys: list[str], run_id: str,
                check: bool) -> tuple[int, list[Done | str]]:
        """Compute the cells ``keys`` of one unit; returns this process's id and what compute() reported."""
        held = self._held(model, train_len)
        unit = self._unit(model, keys)
        if check:
            compute.check(held.engine, [unit])
        sink = Collect()
        compute.compute(held.engine, unit, unit.cells, held.loaded.device, run_id, sink)
        return os.getpid(), sink.events

    def _held(self, model: str, train_len: int) -> compute.Model:
        if self.name != model:  # a worker serves one model; a restarted one loads it again
            self.model = None
            self.model = compute.load(self.options, model, train_len, device_map=self.device_map)
            self.name = model
        return self.model

    def _unit(self, model: str, keys: list[str]) -> Unit:
        """The unit of these cells, planned here from the same options as the driver's (tasks and data are
        this worker's own, loaded on first use)."""
        if not self.units or next(iter(self.units.values())).model != model:
            the_plan = plan(replace(self.options, models=[model], shard=None))
            self.units = {unit.key(cell): unit for unit in the_plan.units for cell in unit.cells}
        missing = [k for k in keys if k not in self.units]
        if missing:
            raise PlanError(f"worker on {platform.node()} planned {model} without the cell {missing[0]}: driver and "
                            "workers must run the same lctx with the same files")
        unit = self.units[keys[0]]
        wanted = set(keys)
        return replace(unit, cells=[c for c in unit.cells if unit.key(c) in wanted])


@dataclass(eq=False)
class Worker:
    """The driver's view of one actor."""

    model: str
    handle: Any
    size: Resources
    info: dict[str, Any] | None = None  # what load() returned
    unit: Unit | None = None  # being computed


@dataclass
class Queue:
    """One model's units still to send, and its workers."""

    units: deque[Unit]
    size: Resources
    limit: int  # workers at most
    check: bool  # data not checked on the driver (tokenizer not loadable alone): the worker checks it
    workers: list[Worker] = field(default_factory=list)
    deaths: int = 0  # workers lost for good (after Ray's retries)


class RayRunner(Runner):
    """The runner with its cells computed by Ray workers; everything else (plan, lock, manifest, memory check,
    tables, report) as in this process."""

    def __init__(self, options: RunOptions, console: Console | None = None):
        super().__init__(options, console)
        self.ray = import_ray()
        self.recorded: set[str] = set()  # cells recorded by this run: a second result for one is dropped
        self.duplicates = 0
        self.cluster: dict[str, float] = {}
        self.gpu_memory: int | None = None
        self.actor = self.ray.remote(LctxWorker)

    def run(self) -> RunResult:
        ray = self.ray
        started = not ray.is_initialized()
        if started:
            try:
                ray.init(address=self.options.ray_address, logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as err:
                where = self.options.ray_address or os.environ.get("RAY_ADDRESS") or "a local cluster"
                raise PlanError(f"cannot connect to the Ray cluster at {where}: {err}") from None
        try:
            self.cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
            self.options = worker_options(self.options, self.cluster)
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
            self.console.print(f"ray: {nodes} node(s), {self.cluster.get('CPU', 0):g} CPUs, "
                               f"{self.cluster.get('GPU', 0):g} GPUs; cells run on {self.options.device}")
            return super().run()
        finally:
            if started:
                ray.shutdown()

    def record_device(self) -> torch.device:
        return torch.device(self.options.device)

    def available_memory(self) -> tuple[int | None, str]:
        if self.options.device == "cuda":
            self.gpu_memory = self.gpu_memory or self.ray.get(self.ray.remote(num_gpus=1)(gpu_memory).remote())
            return self.gpu_memory, "each GPU"
        return None, "cpu"

    # -- the driver's loop --

    def compute_units(self, todo: list[Unit], checked: set[str]) -> None:
        if not todo:
            return
        ray = self.ray
        if self.options.device == "cuda" and self.gpu_memory is None:
            self.available_memory()
        queues: dict[str, Queue] = {}
        for model in dict.fromkeys(u.model for u in todo):
            units = [u for u in todo if u.model == model]
            known = [u.estimate.total for u in units if u.estimate is not None]
            size = resources(max(known) if known else None, self.gpu_memory, self.options.device_map)
            capacity = size.capacity(self.cluster)
            if capacity < 1:
                raise PlanError(f"a worker for {model} needs {size.describe()}; the Ray cluster has "
                                + ", ".join(f"{k} {memory.format_size(v) if k == 'memory' else f'{v:g}'}"
                                            for k, v in sorted(self.cluster.items()) if k in ("CPU", "GPU", "memory")))
            queues[model] = Queue(deque(units), size, min(capacity, len(units)), model not in checked)
            self.console.print(f"ray: {model}: up to {queues[model].limit} worker(s) of {size.describe()}")
        waiting: dict[Any, Worker] = {}  # a pending load() or compute() -> its worker
        workers_seen: list[dict[str, Any]] = []
        self.manifest_extra = {"executor": "ray", "ray": {"resources": self.cluster, "workers": workers_seen}}
        n_cells = sum(len(u.cells) for u in todo)
        finished = 0
        with self.progress() as progress:
            bar = progress.add_task("ray", total=sum(u.cost() for u in todo), cells=f"0/{n_cells} cells")
            try:
                while any(q.units or q.workers for q in queues.values()):
                    self._staff(queues, waiting)
                    self._dispatch(queues, waiting)
                    if not waiting:  # the last idle workers were just stopped
                        continue
                    busy = sum(1 for w in waiting.values() if w.unit is not None)
                    workers = sum(len(q.workers) for q in queues.values())
                    progress.update(bar, description=f"ray · {busy} of {workers} workers busy")
                    ready, _ = ray.wait(list(waiting), num_returns=1, timeout=1.0)
                    for ref in ready:
                        worker = waiting.pop(ref)
                        if worker.unit is None:
                            self._loaded(queues[worker.model], worker, ref, workers_seen)
                            continue
                        unit, worker.unit = worker.unit, None
                        self._returned(queues[worker.model], worker, unit, ref)
                        finished += len(unit.cells)
                        progress.advance(bar, unit.cost())
                        progress.update(bar, cells=f"{finished}/{n_cells} cells")
            finally:
                for queue in queues.values():
                    for worker in queue.workers:
                        ray.kill(worker.handle)
        if self.duplicates:
            self.console.print(f"ray: {self.duplicates} duplicate result(s) of cells already recorded were dropped")

    def _staff(self, queues: dict[str, Queue], waiting: dict[Any, Worker]) -> None:
        """Start workers for the first model with units waiting (the next model's start as this one's stop)."""
        for model, queue in queues.items():
            if not queue.units:
                continue
            busy = sum(1 for w in queue.workers if w.unit is not None)
            wanted = min(queue.limit, len(queue.units) + busy)
            while len(queue.workers) < wanted and queue.deaths <= RAY_RETRIES:
                actor = self.actor.options(
                    max_restarts=RAY_RETRIES, max_task_retries=RAY_RETRIES, **queue.size.ray_options(),
                ).remote(self.options, str(Path.cwd()), queue.size.device_map)
                worker = Worker(model, actor, queue.size)
                queue.workers.append(worker)
                waiting[actor.load.remote(model, queue.units[0].train_len)] = worker
            if not queue.workers:  # every worker for it died for good: its cells are errors, to retry next run
                while queue.units:
                    self._lost(queue.units.popleft(), f"workers for {model} died {queue.deaths} times")
                continue
            return

    def _dispatch(self, queues: dict[str, Queue], waiting: dict[Any, Worker]) -> None:
        """Send units to loaded idle workers; stop idle workers whose model has none left."""
        busy_or_loading = set(waiting.values())
        for model, queue in queues.items():
            for worker in list(queue.workers):
                if worker in busy_or_loading:
                    continue
                if not queue.units:
                    self.ray.kill(worker.handle)
                    queue.workers.remove(worker)
                    continue
                unit = worker.unit = queue.units.popleft()
                keys = [unit.key(cell) for cell in unit.cells]
                waiting[worker.handle.compute.remote(model, unit.train_len, keys, self.run_id, queue.check)] = worker

    def _loaded(self, queue: Queue, worker: Worker, ref: Any, seen: list[dict[str, Any]]) -> None:
        try:
            worker.info = info = self._get(ref)
        except _died(self.ray) as err:
            queue.workers.remove(worker)
            queue.deaths += 1
            self.console.print(f"[yellow]ray: a worker for {escape(worker.model)} died while loading it: "
                               f"{escape(_first_line(err))}[/]")
            return
        seen.append(dict(info))
        if (info["lctx_version"], info["git"]) != (provenance.lctx_version(), provenance.git_revision()):
            self.console.print(f"[yellow]warning:[/] the worker on {escape(info['host'])} runs lctx "
                               f"{info['lctx_version']} ({(info['git'] or {}).get('revision', '?')[:12]}), this "
                               f"driver {provenance.lctx_version()} "
                               f"({(provenance.git_revision() or {}).get('revision', '?')[:12]})")
        self.console.print(f"ray: worker pid {info['pid']} on {escape(info['host'])} loaded {escape(worker.model)} "
                           f"on {info['device']} in {info['seconds']:.1f} s")

    def _returned(self, queue: Queue, worker: Worker, unit: Unit, ref: Any) -> None:
        """Record what a unit returned (each cell once), or its cells as lost when Ray gave up on its worker."""
        try:
            pid, events = self._get(ref)
        except _died(self.ray) as err:
            queue.workers.remove(worker)
            queue.deaths += 1
            oom = isinstance(err, self.ray.exceptions.OutOfMemoryError)
            self._lost(unit, f"worker died {RAY_RETRIES + 1} times computing it: {_first_line(err)}", oom)
            return
        if worker.info is not None and pid != worker.info["pid"]:
            self.note(f"ray: the worker for {worker.model} was restarted (pid {worker.info['pid']} → {pid}) and "
                      "loaded the model again")
            worker.info["pid"] = pid
        for event in events:
            if isinstance(event, str):
                self.note(event)
            else:
                self.accept(unit, event)

    def accept(self, unit: Unit, done: Done) -> bool:
        """Record a returned cell unless this run recorded it already (a retried unit's late duplicate)."""
        key = results.cell_key(done.record)
        if key in self.recorded:
            self.duplicates += 1
            return False
        self.recorded.add(key)
        self.done(unit, done)
        return True

    def _lost(self, unit: Unit, why: str, oom: bool = False) -> None:
        device = self.record_device()
        for cell in unit.cells:
            record = compute.make_record(unit, cell, run_id=self.run_id, status="oom" if oom else "error",
                                         meter=Meter(device), device=device, error=f"WorkerDied: {why}")
            self.accept(unit, Done(cell, record))

    def _get(self, ref: Any) -> Any:
        """A result; an error raised inside the worker (a model that does not load, data that does not fit) is
        raised here as itself, as it would be in this process."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise


def _died(ray) -> tuple[type[BaseException], ...]:
    """Ray's errors for a worker lost (after its own retries), as opposed to an error raised by lctx."""
    ex = ray.exceptions
    return (ex.RayActorError, ex.WorkerCrashedError, ex.OutOfMemoryError, ex.NodeDiedError)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"

