"""The results store: one JSON line per cell, appended and flushed as soon as the cell is computed.

Layout of an output directory (``--out``, default ``results/``)::

    records.jsonl                    unsharded runs
    records-shard-I-of-N.jsonl       ``--shard I/N`` runs (one file per shard; merged on read)
    manifest-<run_id>.json           one per run: command line, versions, git revision, device, settings
    table.md                         the comparison table, rewritten at the end of each run

A **cell** is one (model, rope, task, length[, depth]) under one configuration. Its key is
(model, rope, task, length, depth, train_len, dtype, attn, config): re-running a command skips cells whose
latest record has status ``ok`` or ``oom`` (``--force`` recomputes; ``error`` cells, and cells skipped by
``--max-memory``, are always retried).
When a key has several records, the last one written wins.

Record schema (``schema`` = 1)::

    schema             1
    run_id             id of the run that wrote it (names its manifest-<run_id>.json)
    model              model reference as given (--model)
    rope               canonical, fully resolved spec, e.g. "yarn:factor=4:beta_fast=32:...:logn=false"
    rope_input         the spec as typed, e.g. "yarn:factor=4"
    task               task name: ppl | passkey | niah | ...
    length             context length in tokens (ppl: tokens per document, BOS included if the tokenizer
                       adds one; passkey/niah: exact prompt length)
    depth              needle depth in [0, 1] for passkey/niah; null otherwise
    train_len          training length the variant was resolved against
    dtype, attn        torch dtype and attention implementation; device: where it ran
    config             task options that change results; part of the key:
                         ppl:     mode (truncated|sliding), stride, last_k, samples, data
                         passkey: samples (trials), seed, max_new_tokens
                         niah:    samples, seed, max_new_tokens, needle, question, data
    status             ok | oom | error
    error              null, or "ExceptionType: message" (status oom/error)
    over_budget        true when the cell was not run because its memory estimate exceeded --max-memory
                       (status oom); such cells are retried by the next run, under its own budget
    metrics            aggregated over samples; {} unless status is ok
                         ppl:     ppl, nll (token-weighted mean NLL, nats), tokens, last_k_ppl, last_k_nll,
                                  last_k_tokens, bucket_nll (8 mean NLLs by position bucket),
                                  bucket_edges (9 positions: bucket b is [edges[b], edges[b+1]))
                         passkey/niah: accuracy, ci_low, ci_high (Wilson 95%), correct, trials
    samples            per-sample values (ppl: one per document with sums; passkey/niah: one per trial
                       with value, output, answer, correct, prompt_tokens, insert_at, depth_actual, and
                       filler: offset of the filler (niah: in the haystack stream; also haystack_tokens,
                       haystack_documents))
    data               where the text came from: ppl: id, description, documents, skipped_short,
                       samples_requested, samples_used, bos_added, bos_ids; passkey/niah: the prompt pieces
                       (niah also the corpus id and description)
    seconds            wall time of the cell's compute (a shared perplexity forward counts once for each cell
                       it served: see shared_forward)
    peak_memory_bytes  CUDA: torch.cuda.max_memory_allocated during the cell (weights included);
                       CPU: peak growth of the process RSS over its value at the start of the cell
    memory_kind        cuda_max_allocated | cpu_rss_growth
    process_peak_bytes CPU: peak RSS of the whole process during the cell (weights, interpreter included)
    memory_estimate_bytes  lctx.memory's up-front estimate for the cell's unit (weights included)
    shared_forward     lengths computed together in one forward (ppl, length-independent variants), if any
    finished_at        ISO-8601 UTC time the record was written (milliseconds)
    traceback          status error only: the end of the Python traceback
    lctx_version       version of lctx that wrote it
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

SCHEMA_VERSION = 1
KEY_FIELDS = ("model", "rope", "task", "length", "depth", "train_len", "dtype", "attn", "config")
DONE = ("ok", "oom")


def cell_key(record: dict[str, Any]) -> str:
    """The identity of a cell as a string (JSON of the key fields, config keys sorted)."""
    return json.dumps([record.get(f) for f in KEY_FIELDS], sort_keys=True, default=str)


def records_name(shard: tuple[int, int] | None) -> str:
    return "records.jsonl" if shard is None else f"records-shard-{shard[0]}-of-{shard[1]}.jsonl"


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as strings so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class Store:
    """Append-only JSONL records under ``root``; reading merges every ``records*.jsonl`` file there."""

    def __init__(self, root: str | Path, shard: tuple[int, int] | None = None):
        self.root = Path(root)
        self.path = self.root / records_name(shard)
        self.bad_lines = 0

    def append(self, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps(_json_safe(record), ensure_ascii=False) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def all_records(self) -> list[dict[str, Any]]:
        """Every record in every records file (files sorted by name, lines in order)."""
        out = []
        self.bad_lines = 0
        for path in sorted(self.root.glob("records*.jsonl")):
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a crash: the cell is simply redone
                        self.bad_lines += 1
                        continue
                    if isinstance(record, dict) and "task" in record:
                        out.append(record)
        return out

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last record of each cell (by finished_at, then file order)."""
        merged: dict[str, dict[str, Any]] = {}
        for record in sorted(self.all_records(), key=lambda r: r.get("finished_at") or ""):
            merged[cell_key(record)] = record
        return merged

    def records(self) -> list[dict[str, Any]]:
        return list(self.latest().values())

    def completed(self) -> set[str]:
        return {key for key, record in self.latest().items()
                if record.get("status") in DONE and not record.get("over_budget")}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temp file then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(_json_safe(payload), indent=2, ensure_ascii=False, default=str) + "\n",
                   encoding="utf-8")
    tmp.replace(path)


# ---- tables ------------------------------------------------------------------------------------------------

# metrics tabulated by default: whole-window perplexity hides a collapse at the far end (the first L_train
# tokens are in distribution), so perplexity tables also show the last-k perplexity
HEADLINE = {"ppl": ("ppl", "last_k_ppl"), "passkey": ("accuracy",), "niah": ("accuracy",)}
ACCURACY_METRICS = {"accuracy", "ci_low", "ci_high"}


def headline(task: str) -> tuple[str, ...]:
    """Metrics a task's table shows: HEADLINE's, else the metric its registered task declares (task families such
    as ``lm-eval:<task>`` are named at run time), else ppl."""
    if task in HEADLINE:
        return HEADLINE[task]
    from lctx import evals

    try:
        tasks = evals.expand(task)
    except evals.TaskError:  # records of a task this lctx does not know
        return ("ppl",)
    return (tasks[0].metric,) if len(tasks) == 1 else ("ppl",)


def format_length(n: int) -> str:
    if n % 1024 == 0:
        return f"{n // 1024}k"
    if n % 512 == 0:
        return f"{n / 1024:g}k"
    return str(n)


def _config_label(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(config.items()) if v is not None)


def frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per record with the key fields, status, seconds and every scalar metric as a column."""
    rows = []
    for r in records:
        row = {f: r.get(f) for f in KEY_FIELDS if f != "config"}
        row["rope_input"] = r.get("rope_input") or r.get("rope")
        row["config"] = _config_label(r.get("config") or {})
        row["status"] = r.get("status")
        row["seconds"] = r.get("seconds")
        for name, value in (r.get("metrics") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                row[name] = value
        rows.append(row)
    return pd.DataFrame(rows)


def _cell_text(status: str, value: Any, metric: str, low=None, high=None) -> str:
    if status == "oom":
        return "OOM"
    if status != "ok":
        return "ERR"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if metric in ACCURACY_METRICS:
        text = f"{100 * value:.0f}%"
        if low is not None and high is not None:
            text += f" [{100 * low:.0f}–{100 * high:.0f}]"
        return text
    value = float(value)
    if math.isinf(value) or abs(value) >= 1e5:
        return f"{value:.2e}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def tables(records: Iterable[dict[str, Any]], metric: str | None = None,
           by_depth: bool = False) -> list[tuple[str, pd.DataFrame]]:
    """Comparison tables: one per (task, model, settings), variants × lengths (× depths with ``by_depth``).

    Accuracy cells pool the trials of all depths at a length (Wilson interval recomputed) unless
    ``by_depth``; a column marked * is past the model's training length.
    """
    from lctx.evals.passkey import wilson

    df = frame(records)
    if df.empty:
        return []
    out = []
    group_cols = ["task", "model", "train_len", "dtype", "attn", "config"]
    for keys, group in df.groupby(group_cols, sort=False, dropna=False):
        task, model, train_len, dtype, attn, config = keys
        for name in ([metric] if metric else headline(task)):
            if name not in group and name != "accuracy":
                group = group.assign(**{name: float("nan")})  # e.g. every cell out of memory
            has_depth = group["depth"].notna().any()
            pooled = name == "accuracy" and has_depth and not by_depth
            columns = ["length", "depth"] if (has_depth and by_depth) else ["length"]
            cells: dict[tuple, dict[tuple, str]] = {}
            ropes = list(dict.fromkeys(group["rope"]))
            for (rope, *col), part in group.groupby(["rope", *columns], sort=False, dropna=False):
                col = tuple(col)
                statuses = set(part["status"])
                status = "error" if "error" in statuses else "oom" if "oom" in statuses else "ok"
                if name == "accuracy":
                    correct = part["correct"].sum() if "correct" in part else 0
                    trials = part["trials"].sum() if "trials" in part else 0
                    value = correct / trials if trials else None
                    low, high = wilson(int(correct), int(trials)) if trials else (None, None)
                    text = _cell_text(status, value, "accuracy", low, high)
                else:
                    value = part[name].iloc[0] if name in part and len(part) == 1 else (
                        part[name].mean() if name in part else None)
                    text = _cell_text(status, value, name)
                cells.setdefault(rope, {})[col] = text
            all_cols = sorted({c for row in cells.values() for c in row}, key=lambda c: tuple(
                float("inf") if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in c))
            header = {c: format_length(int(c[0])) + ("*" if train_len and c[0] > train_len else "")
                      + (f" @{c[1]:g}" if len(c) > 1 else "") for c in all_cols}
            typed = dict(zip(group["rope"], group["rope_input"], strict=True))
            labels = [typed.get(rope) or rope for rope in ropes]
            if len(set(labels)) < len(labels):  # two resolutions of one typed spec: show the canonical forms
                labels = ropes
            table = pd.DataFrame(
                [[cells[rope].get(c, "") for c in all_cols] for rope in ropes],
                index=pd.Index(labels, name="rope"), columns=[header[c] for c in all_cols],
            )
            title = (f"{task} · {name}{' (all depths pooled)' if pooled else ''} · {model} · train_len "
                     f"{train_len} · {dtype}/{attn} · {config}")
            out.append((title, table))
    return out


def metric_names(records: Iterable[dict[str, Any]]) -> list[str]:
    """Scalar metrics present in the records (for --metric)."""
    df = frame(records)
    fixed = {*KEY_FIELDS, "rope_input", "status"}
    return sorted(c for c in df.columns if c not in fixed)


def to_markdown(named_tables: list[tuple[str, pd.DataFrame]]) -> str:
    parts = []
    for title, table in named_tables:
        header = ["rope", *map(str, table.columns)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for rope, row in table.iterrows():
            lines.append("| " + " | ".join([f"`{rope}`", *map(str, row.tolist())]) + " |")
        parts.append(f"### {title}\n\n" + "\n".join(lines))
    note = "\n\n\\* past the model's training length. OOM: out of memory. ERR: error (see the records).\n"
    return "\n\n".join(parts) + note if parts else "(no records)\n"


def rich_tables(named_tables: list[tuple[str, pd.DataFrame]]):
    """rich Table objects for printing."""
    from rich.table import Table

    out = []
    for title, table in named_tables:
        rich_table = Table(title=title, title_justify="left", caption="* past the training length",
                           caption_justify="left")
        rich_table.add_column("rope", overflow="fold", style="bold")
        for column in table.columns:
            rich_table.add_column(str(column), justify="right")
        for rope, row in table.iterrows():
            rich_table.add_row(str(rope), *map(str, row.tolist()))
        out.append(rich_table)
    return out
