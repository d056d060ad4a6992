"""The results store: one JSON line per cell, appended and synced as soon as the cell is computed.

Layout of an output directory (``--out``, default ``results/``)::

    records.jsonl                    unsharded runs
    records-shard-I-of-N.jsonl       ``--shard I/N`` runs (one file per shard; merged on read)
    manifest-<run_id>.json           one per run: command line, versions, git revision, device, settings
    table.md, report/                the tables and the report, rewritten at the end of each run

**What survives a crash.** Every finished cell is one line, written with a single ``write`` and ``fsync``ed
before the next cell starts. A process killed mid-line (or a full disk) leaves at most a torn last line: readers
skip it (and say so), the next writer drops it when it takes the lock (a record whole but for its newline is
ended instead), and an append always starts on a line of its own. Lines are decoded one by one, so a cut inside
a multi-byte character loses that line only.

**One writer per records file.** A writer holds an advisory lock (``fcntl.flock`` on ``.<records file>.lock``)
for as long as it runs; a second process asking for the same file is refused at once, naming the holder. Shards
write separate files, so shards of one run share a directory safely. Locks are local to a machine: across
machines, give each its own ``--shard`` (or its own directory).

A **cell** is one (model, rope, task spec, length[, depth]) under one configuration; its key is
(model, model_fingerprint, rope, task_spec, length, depth, train_len, dtype, attn). When a key has several
records, the newest (by ``finished_at``, then file order) wins. Re-running a command skips cells whose newest record
has status ``ok`` or ``oom`` (``--force`` recomputes; ``error`` cells, and cells skipped by ``--max-memory``, are
always retried).

Record schema (``schema`` = 2)::

    schema             2 (1: before task specs; still read, see lctx.evals.upgrade)
    run_id             id of the run that wrote it (names its manifest-<run_id>.json)
    model              model reference as given (--model)
    model_fingerprint  local models: a hash of config.json and of each weight/tokenizer file's size, first and last
                       MiB (lctx.models.fingerprint); null for hub ids. Records without it (written before it
                       existed) count as the model's current files
    rope               canonical, fully resolved spec, e.g. "yarn:factor=4:beta_fast=32:...:logn=false"
    rope_input         the spec as typed, e.g. "yarn:factor=4"
    task               task name: ppl | passkey | niah | synthetic:niah-single | longbench:qasper | ...
    task_spec          canonical task spec: the name and every parameter that changes results,
                       e.g. "passkey:samples=5:seed=0:max_new_tokens=8:chat_template=false"
    config             the same parameters as an object (lctx.evals.Task.identity)
    length             context length in tokens
    depth              needle depth in [0, 1] for passkey/niah; null otherwise
    train_len          training length the variant was resolved against
    dtype, attn        torch dtype and attention implementation; device: where it ran
    status             ok | oom | error
    error              null, or "ExceptionType: message" (status oom/error)
    over_budget        true when the cell was not run because its memory estimate exceeded --max-memory
    metrics            aggregated over samples; {} unless status is ok (the task module documents its own)
    samples            per-sample values (documents, trials, examples)
    data               where the text came from and the prompt pieces
    seconds            wall time of the cell's compute (a shared forward counts once for each cell it served)
    peak_memory_bytes  CUDA: torch.cuda.max_memory_allocated during the cell (weights included);
                       CPU: peak growth of the process RSS over its value at the start of the cell
    memory_kind        cuda_max_allocated | cpu_rss_growth
    process_peak_bytes CPU: peak RSS of the whole process during the cell
    memory_estimate_bytes  lctx.memory's up-front estimate for the cell's unit (weights included)
    shared_forward     lengths computed together in one forward (ppl, length-independent variants), if any
    finished_at        ISO-8601 UTC time the record was written (milliseconds)
    traceback          status error only: the end of the Python traceback
    lctx_version       version of lctx that wrote it
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
KEY_FIELDS = ("model", "model_fingerprint", "rope", "task_spec", "length", "depth", "train_len", "dtype", "attn")
DONE = ("ok", "oom")
# field -> the JSON types a readable record may hold there (None: the field may be null or missing)
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "rope": (str,), "task": (str,), "length": (int,), "depth": (int, float, type(None)),
    "train_len": (int, type(None)), "dtype": (str, type(None)), "attn": (str, type(None)),
    "config": (dict, type(None)), "status": (str,), "metrics": (dict, type(None)),
    "finished_at": (str, type(None)), "task_spec": (str, type(None)), "schema": (int, type(None)),
    "model_fingerprint": (str, type(None)),
}


class StoreError(OSError):
    """The store cannot be written: another process holds it, or its records come from a newer lctx."""


def cell_key(record: dict[str, Any]) -> str:
    """The identity of a cell as a string (JSON of the key fields)."""
    return json.dumps([record.get(f) for f in KEY_FIELDS], sort_keys=True, default=str)


def records_name(shard: tuple[int, int] | None) -> str:
    return "records.jsonl" if shard is None else f"records-shard-{shard[0]}-of-{shard[1]}.jsonl"


def json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as strings so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def problem(record: Any) -> str | None:
    """Why a decoded line is not a readable record (None when it is)."""
    if not isinstance(record, dict) or "task" not in record:
        return "not a record"
    for name, types in FIELD_TYPES.items():
        value = record.get(name)
        if name in ("model", "rope", "task", "length", "status") and name not in record:
            return f"no {name!r}"
        if isinstance(value, bool) or (value is not None and not isinstance(value, types)):
            return f"field {name!r} is {type(value).__name__}"
    if (record.get("schema") or 1) > SCHEMA_VERSION:
        return f"schema {record['schema']} (this lctx reads up to {SCHEMA_VERSION}; upgrade lctx)"
    return None


@dataclass
class Skipped:
    """Lines the reader could not use, with where they are (file:line) and why."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    newer_schema: int = 0

    def __bool__(self) -> bool:
        return bool(self.lines)

    def describe(self, limit: int = 3) -> str:
        shown = "; ".join(f"{where}: {why}" for where, why in self.lines[:limit])
        more = f"; and {len(self.lines) - limit} more" if len(self.lines) > limit else ""
        return f"{len(self.lines)} unreadable line(s) skipped ({shown}{more})"


class Store:
    """Append-only JSONL records under ``root``; reading merges every ``records*.jsonl`` file there."""

    def __init__(self, root: str | Path, shard: tuple[int, int] | None = None):
        self.root = Path(root)
        self.path = self.root / records_name(shard)
        self.skipped = Skipped()
        self._lock: int | None = None

    # -- writing --

    def check(self) -> None:
        """Fail now, with one line and creating nothing, when the directory could not be written (a file in the
        way, no permission)."""
        problem = unwritable(self.root)
        if problem:
            raise StoreError(f"results directory {str(self.root)!r} cannot be written: {problem}; choose another --out")

    @contextlib.contextmanager
    def writing(self) -> Iterator[Store]:
        """Hold the records file's lock for the block; StoreError when another process holds it or when the
        directory's records come from a newer lctx (writing older records among them would confuse it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise StoreError(f"{self.path} is being written by {holder}; wait for it to finish, or use another "
                             "--out (or --shard i/n to split the work)") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
            self._end_torn_tail()
            self.read()
            if self.skipped.newer_schema:
                raise StoreError(f"{self.root} holds {self.skipped.newer_schema} record(s) of a newer schema than "
                                 f"this lctx writes ({SCHEMA_VERSION}); upgrade lctx or use another --out")
            self._lock = fd
            yield self
        finally:
            self._lock = None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)

    def _end_torn_tail(self) -> None:
        """Under the lock: a last line cut by a crash is dropped (a whole record missing only its newline is
        ended instead), so the file holds whole lines only and readers stop warning about it."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) == b"\n":
                return
            size = handle.seek(0, os.SEEK_END)
            start = max(0, size - 2**20)
            handle.seek(start)
            block = handle.read()
            cut = block.rfind(b"\n") + 1
            tail = block[cut:]
            try:
                whole = isinstance(json.loads(tail.decode("utf-8")), dict)
            except (UnicodeDecodeError, json.JSONDecodeError):
                whole = False
            if whole:
                handle.write(b"\n")
            elif cut or start == 0:
                handle.truncate(start + cut)
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line and sync it; a torn last line (a crash mid-write) is ended first."""
        line = (json.dumps(json_safe(record), ensure_ascii=False) + "\n").encode("utf-8")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as handle:
                if handle.tell() > 0:
                    with self.path.open("rb") as tail:
                        tail.seek(-1, os.SEEK_END)
                        if tail.read(1) != b"\n":
                            line = b"\n" + line
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            raise StoreError(f"cannot write a record to {self.path}: {err.strerror or err}. The records written "
                             "before are kept; free space (or fix the directory) and run the same command again to "
                             "resume") from None

    # -- reading --

    def files(self) -> list[Path]:
        return sorted(self.root.glob("records*.jsonl"))

    def read(self) -> list[dict[str, Any]]:
        """Every readable record of every records file (files sorted by name, lines in order); what could not
        be read is in :attr:`skipped`."""
        out = []
        self.skipped = Skipped()
        for path in self.files():
            try:
                content = path.read_bytes()
            except OSError as err:
                self.skipped.lines.append((str(path), f"cannot read ({err.strerror})"))
                continue
            out += parse(content, path.name, self.skipped)
        return out


def parse(content: bytes, name: str, skipped: Skipped) -> list[dict[str, Any]]:
    """The readable records of one records file's bytes (a file, an archive member, a download); the lines that
    are not are added to ``skipped`` as ``name:line``."""
    out = []
    for number, raw in enumerate(content.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{name}:{number}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            skipped.lines.append((where, "not UTF-8 (cut by a crash?)"))
            continue
        except json.JSONDecodeError:
            skipped.lines.append((where, "not JSON (cut by a crash?)"))
            continue
        why = problem(record)
        if why is not None:
            skipped.lines.append((where, why))
            if why.startswith("schema"):
                skipped.newer_schema += 1
            continue
        out.append(record)
    return out


def unwritable(directory: Path) -> str | None:
    """Why ``directory`` could not be created or written, or None; creates nothing (checked before any work)."""
    existing = Path(directory)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{str(existing)!r} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {str(existing)!r}"
    return None


def newest(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The newest record of each cell (by finished_at, then order)."""
    merged: dict[str, dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: r.get("finished_at") or ""):
        merged[cell_key(record)] = record
    return merged


def completed(records: dict[str, dict[str, Any]]) -> set[str]:
    """Keys of the cells a run skips: newest record ok or oom, not skipped for its memory estimate."""
    return {key for key, record in records.items()
            if record.get("status") in DONE and not record.get("over_budget")}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temp file, fsync, rename): a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(payload), indent=2, ensure_ascii=False, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (the tables, a report page)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
