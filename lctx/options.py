"""What a run is asked for: the grid (models × variants × tasks × lengths) and the run's own settings.

Task parameters are not here: they belong to the task specs (:mod:`lctx.evals`). A run only carries
``task_defaults``, values that apply to every selected task declaring the parameter (``--samples 3``,
``--task-arg haystack=noise``, an experiment file's ``[options] samples = 3``); a value no selected task takes is an
error when the tasks are resolved. The run's own settings are :class:`lctx.spec.Param` declarations
(:data:`RUN_PARAMS`), so the command line and experiment files check them the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lctx import memory
from lctx.spec import Param, SpecError, Tokens, parse_lengths

EXECUTORS = ("local", "ray")
DTYPES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
RUN_PARAMS = (
    Param("dtype", str, "auto", "weights and activations: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16",
          choices=DTYPES),
    Param("device", str, "auto", "auto, cpu, cuda, cuda:N"),
    Param("attn", str, "sdpa", "attention implementation: sdpa, eager, flash_attention_2"),
    Param("device_map", str, None, "'auto' to spread a large model over the available devices (accelerate)"),
    Param("train_len", Tokens, None, "override the model's training length", ge=2),
    Param("target_len", Tokens, None, "length the variants scale for: factor = target / training length where a "
          "spec gives none", ge=2),
    Param("max_memory", str, None, "skip (record as oom) cells whose up-front memory estimate, weights included, is "
          "over this size, e.g. 3GiB"),
    Param("prefill_chunk", Tokens, None, "generation tasks: feed the prompt through the KV cache this many tokens "
          "at a time (e.g. 4k); results are the same", ge=1),
    Param("batch_size", int, 1, "generation tasks: answer this many prompts of one length side by side (no "
          "padding, so answers are those of batch 1 up to float rounding); the memory estimate grows with it", ge=1),
    Param("report", bool, True, "write the report (figures and dashboard) under the results directory at the end"),
    Param("trust_remote_code", bool, False, "let a model run its own Python code (auto_map in its config); off, "
          "such a model is refused with one line, never an interactive question"),
    Param("executor", str, "local", "where cells are computed: local (this process) or ray (a Ray cluster's "
          "workers; pip install 'lctx[ray]')", choices=EXECUTORS),
    Param("ray_address", str, None, "Ray cluster to use with --executor ray (default: $RAY_ADDRESS, else a "
          "local cluster started for the run)"),
)
RUN_PARAM_NAMES = tuple(p.name for p in RUN_PARAMS)


@dataclass
class RunOptions:
    """A parsed run: the grid, task defaults and the run's settings (see the module docstring)."""

    models: list[str]
    ropes: list[str]
    tasks: list[str]
    lengths: list[int]
    task_defaults: dict[str, Any] = field(default_factory=dict)
    out: Path = Path("results")
    force: bool = False
    shard: tuple[int, int] | None = None
    dtype: str = "auto"
    device: str = "auto"
    attn: str = "sdpa"
    device_map: str | None = None
    train_len: int | None = None
    target_len: int | None = None
    max_memory: int | None = None  # bytes
    prefill_chunk: int | None = None
    batch_size: int = 1
    report: bool = True
    trust_remote_code: bool = False
    executor: str = "local"
    ray_address: str | None = None
    argv: list[str] = field(default_factory=list)


def run_settings(values: dict[str, Any], owner: str) -> dict[str, Any]:
    """Run settings from raw values (strings or TOML values), checked against :data:`RUN_PARAMS`."""
    known = {p.name: p for p in RUN_PARAMS}
    out: dict[str, Any] = {}
    for key, raw in values.items():
        if raw is None:
            continue
        value = known[key].convert(raw, owner)
        if key == "max_memory":
            value = memory.parse_size(value)
        out[key] = value
    return out


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
            raise ValueError(f"invalid task argument {item!r}: use KEY=VALUE, e.g. --task-arg haystack=noise")
        parsed[key.strip()] = value.strip()
    return parsed


def lengths(values: Any) -> list[int]:
    """Lengths from the command line (``4k,8k``) or an experiment file (``[4096, "8k"]``)."""
    try:
        return parse_lengths(values)
    except ValueError as err:
        raise SpecError(str(err)) from None
