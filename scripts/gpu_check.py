#!/usr/bin/env python3
"""One-command GPU check of lctx (issue 16): parity on CUDA in fp32 and bf16, and a long-context benchmark.

A GPU machine is lent for minutes, once, without internet; this is everything to run there, from the repository
root::

    python scripts/gpu_check.py --out $OUT        # or: scripts/gpu-check.sh --out $OUT

It is meant to finish in under 8 minutes: ``--budget`` (default 450 s, counted from the start) bounds the
benchmark, which skips a length whose predicted time no longer fits; the 714 parity checks (tiny models,
launch-bound) are expected to take one to two minutes, not yet measured on a GPU. It needs only torch and
transformers: the checkout's ``lctx`` is imported from the repository (no install), and neither
``lctx.patches`` nor ``lctx.engine`` imports anything else (no task, so neither lm-eval nor LongBench's metric
libraries). The cached-decoding checks and the benchmark decode through lctx's own generation helper
(:func:`engine_greedy`); tests/test_gpu_check.py imports it with lm-eval and the metric libraries hidden.

1. **Parity** (scripts/gpu_parity.py; tiny random decoders of tests/tiny.py; each check fails alone, an
   exception included):
   frequency variants against transformers' own ``rope_parameters``; identity (``none`` and factor 1 bit-exact,
   the model bit-exact after a patch exits); the ReRoPE family against attention written from its position
   formulas, with every score materialised (query chunks of 7 rows, and a longer input with lctx's own chunk
   size, so the CUDA kernel path and its merges are crossed); left-padded batches against each row alone;
   cached greedy decoding (transformers' ``generate``, lctx's greedy, lctx's greedy with chunked prefill,
   left-padded ``generate``) against recomputation without a cache. In float32 the bounds are the CPU tests';
   in bfloat16 see :data:`BF16_SLACK`.
2. **Benchmark**: a random-weight Llama of about 1.1B parameters (bf16, SDPA, training length 8k) at 8k, 32k,
   128k and 256k tokens for ``none``, ``yarn:factor=16``, ``dynamic-ntk:factor=16`` and ``rerope``: prefill time
   and peak memory (``torch.cuda.max_memory_allocated``) as ratios to ``none``, tokens/s of cached greedy
   decoding, and the largest length that fits. An OOM is a result (the variant stops there); a length whose
   predicted time no longer fits the budget is skipped, and the outputs are written anyway.

Outputs under ``--out`` (default ``gpu-check-out/``), rewritten after every section and benchmark cell so that a
killed run leaves what it had: ``gpu-check.md`` (a block for BENCHMARKS.md, also printed at the end),
``gpu-check.json`` and ``gpu-check.log`` (the progress lines, also on stderr). Exit status: 0 when every parity
check passed and no section crashed, 1 when a parity check failed (or parity could not run), 2 when the benchmark
crashed (an OOM is a result, not a crash).

``--dry`` runs the same code on CPU at tiny sizes (a tiny Llama instead of 1B, lengths 256 and 512) in well under
a minute; tests/test_gpu_check.py runs it in CI.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts from here: imports and CUDA start-up are part of the 8 minutes

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: the parity checks beside this script

import gpu_parity  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from gpu_parity import (  # noqa: E402
    BF16_SLACK,
    FP32_TOL,
    GROUP_TEXT,
    ROOT,
    dtype_name,
    engine_greedy,
    free,
    short_error,
    sync,
    tiny,
)
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from lctx import patches  # noqa: E402
from lctx.patches import rerope  # noqa: E402

BENCH_VARIANTS = ("none", "yarn:factor=16", "dynamic-ntk:factor=16", "rerope")
REPS = 3  # timed runs of a benchmark cell when one is cheap (median reported) ...
REPEAT_UNDER_S = 3.0  # ... i.e. when it took under this many seconds; otherwise one
RESERVE_S = 10.0  # budget kept for writing the outputs
GiB = 2**30

@dataclass(frozen=True)
class Sizes:
    """What a run covers: the full GPU run, or the dry run on CPU (same code, tiny sizes)."""

    device: str
    dtypes: tuple[torch.dtype, ...]
    frequency: tuple[str, ...]  # setups of each parity group
    identity: tuple[str, ...]
    attention: tuple[str, ...]
    attention_long: tuple[str, ...]  # setups checked at ``long_length`` with lctx's own chunk size
    long_length: int
    long_chunk: int
    padding: tuple[str, ...]
    decode: tuple[str, ...]
    bench_model: dict[str, Any]  # LlamaConfig arguments
    bench_lengths: tuple[int, ...]
    bench_steps: int  # greedy tokens per benchmark run
    warmup_len: int
    budget_s: float


FREQUENCY_ARCHS = tuple(a for a in tiny.ARCHS if a != "phi3")  # Phi-3's config accepts only longrope scaling
FULL = Sizes(
    device="cuda", dtypes=(torch.float32, torch.bfloat16), frequency=FREQUENCY_ARCHS, identity=tiny.ARCHS,
    attention=("llama", "mistral+sliding", "qwen3", "gemma2", "phi3", "gpt_neox", "llama+yarn-checkpoint"),
    attention_long=("llama", "gemma2"), long_length=2100, long_chunk=rerope.CHUNK_SIZE,
    padding=("llama", "gemma2", "gpt_neox"), decode=("llama", "gemma2", "phi3"),
    bench_model=dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192),
    bench_lengths=(8192, 32768, 131072, 262144), bench_steps=32, warmup_len=2048, budget_s=450.0,
)
DRY = Sizes(
    device="cpu", dtypes=(torch.float32, torch.bfloat16), frequency=("llama", "gpt_neox"),
    identity=("llama", "gemma2"), attention=("llama", "gemma2"), attention_long=("llama",), long_length=150,
    long_chunk=64, padding=("llama",), decode=("llama",),
    bench_model=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    bench_lengths=(256, 512), bench_steps=4, warmup_len=64, budget_s=120.0,
)


# ---- progress ----------------------------------------------------------------------------------------------

LOG_FILE: list[Path] = []  # where log() also writes, once --out is known


def log(message: str) -> None:
    """A progress line on stderr (flushed: readable as it happens on an unbuffered remote run) and in the log."""
    line = f"[{time.monotonic() - STARTED:6.1f}s] {message}"
    print(line, file=sys.stderr, flush=True)
    for path in LOG_FILE:
        with path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


# ---- benchmark ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float  # the whole generation
    prefill_s: float
    peak_bytes: int | None  # torch.cuda.max_memory_allocated over the prefill (None on CPU)
    decode_tokens_per_s: float


@contextlib.contextmanager
def probe(model: nn.Module, device: torch.device) -> Iterator[list[list[float | int | None]]]:
    """Record [start, end, peak bytes] of every forward of ``model`` (synchronised), however the caller loops.

    lctx's greedy does one forward for the prefill and one per new token, so one call gives both timings.
    """
    calls: list[list[float | int | None]] = []

    def before(module: nn.Module, args: Any) -> None:
        sync(device)
        calls.append([time.perf_counter(), None, None])

    def after(module: nn.Module, args: Any, output: Any) -> None:
        sync(device)
        calls[-1][1] = time.perf_counter()
        calls[-1][2] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def timed_greedy(model: nn.Module, greedy: Callable[..., list[int]], prompt: list[int], steps: int,
                 device: torch.device) -> Run:
    """One cached greedy generation of ``steps`` tokens: prefill time and peak, then decoding throughput."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    with probe(model, device) as calls:
        greedy(model, prompt, steps, set())
    (start, prefilled, peak), *_ = calls
    decoded = len(calls) - 1  # forwards after the prefill, one token each
    return Run(time.perf_counter() - began, prefilled - start, peak,
               decoded / (calls[-1][1] - prefilled) if decoded else 0.0)


@dataclass
class Budget:
    total_s: float

    def left(self) -> float:
        return self.total_s - (time.monotonic() - STARTED)


def benchmark(sizes: Sizes, device: torch.device, budget: Budget, report: Callable[[dict], None]) -> dict[str, Any]:
    """Prefill and decoding of the random-weight Llama for every (length, variant) that fits in memory and time."""
    greedy = engine_greedy()
    config = LlamaConfig(**sizes.bench_model, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # weights initialised where they live: seconds, not a minute of CPU init
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(device).eval()  # (a no-op unless this transformers builds it elsewhere)
    train_len = config.max_position_embeddings
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    section: dict[str, Any] = {
        "status": "running", "cells": [], "lengths": list(sizes.bench_lengths),
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "weights_bytes": weights,
                  "dtype": "bfloat16", "attn": "sdpa", "train_len": train_len, **sizes.bench_model},
        "steps": sizes.bench_steps, "reps": REPS, "repeat_under_s": REPEAT_UNDER_S,
    }
    log(f"benchmark model: {count(section['model']['parameters'])} parameters on {device}")
    stopped: dict[str, str] = {}  # variant -> why its longer lengths are not run
    last_run: dict[str, tuple[int, float]] = {}  # variant -> (length, seconds of one run)
    warmed: set[str] = set()
    for length in sizes.bench_lengths:
        prompt = torch.randint(3, config.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
        prompt = prompt.tolist()
        for spec in BENCH_VARIANTS:
            cell: dict[str, Any] = {"variant": spec, "length": length}
            if spec in stopped:
                cell.update(status="skipped", detail=stopped[spec])
            else:
                predicted = 0.0
                if spec in last_run:  # attention makes time grow up to quadratically with length
                    previous, seconds = last_run[spec]
                    predicted = seconds * (length / previous) ** 2
                if budget.left() - RESERVE_S < predicted:
                    stopped[spec] = f"time budget (predicted {predicted:.0f} s, {budget.left():.0f} s left)"
                    cell.update(status="budget", detail=stopped[spec])
                else:
                    cell.update(run_cell(model, greedy, spec, train_len, prompt, sizes, device, budget, warmed))
                    if cell["status"] == "ok":
                        last_run[spec] = (length, cell["run_s"])
                    elif cell["status"] == "oom":
                        stopped[spec] = f"OOM at {length}"
            free(device)
            section["cells"].append(cell)
            log(f"benchmark {spec} at {length}: {cell['status']} "
                + (f"prefill {cell['prefill_s']:.3f} s, decode {cell['decode_tokens_per_s']:.1f} tok/s"
                   if cell["status"] == "ok" else cell.get("detail", "")))
            report(section)
    section["largest_fit"] = {
        spec: max((c["length"] for c in section["cells"] if c["variant"] == spec and c["status"] == "ok"),
                  default=None) for spec in BENCH_VARIANTS}
    section["status"] = "error" if any(c["status"] == "error" for c in section["cells"]) else "done"
    return section


def run_cell(model: nn.Module, greedy: Callable[..., list[int]], spec: str, train_len: int, prompt: list[int],
             sizes: Sizes, device: torch.device, budget: Budget, warmed: set[str]) -> dict[str, Any]:
    """Warm up (once per variant), then time up to REPS runs; an OOM is the cell's result, not a failure."""
    steps = sizes.bench_steps
    runs: list[Run] = []
    oom = False
    started = time.monotonic()
    try:
        with patches.apply(model, spec, train_len, seq_len=len(prompt) + steps):
            if spec not in warmed:
                greedy(model, prompt[:sizes.warmup_len], 2, set())
                warmed.add(spec)
            while True:
                runs.append(timed_greedy(model, greedy, prompt, steps, device))
                took = runs[-1].seconds
                if len(runs) >= REPS or took > REPEAT_UNDER_S or budget.left() - RESERVE_S < took:
                    break
    except torch.cuda.OutOfMemoryError:
        oom = True  # handled below, once the exception (and the tensors its frames hold) is gone
    except Exception as err:  # noqa: BLE001 (reported as this cell's error; the other cells still run)
        log(f"benchmark {spec} at {len(prompt)} crashed: {traceback.format_exc()}")
        return {"status": "error", "detail": short_error(err)}
    if oom:
        free(device)
        return {"status": "oom", "detail": f"out of memory ({len(runs)} runs done)"}
    peaks = [r.peak_bytes for r in runs if r.peak_bytes is not None]
    return {
        "status": "ok", "runs": len(runs), "seconds": time.monotonic() - started,
        "prefill_s": statistics.median(r.prefill_s for r in runs),
        "prefill_s_all": [r.prefill_s for r in runs],
        "peak_bytes": max(peaks) if peaks else None,
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs),
        "run_s": statistics.median(r.seconds for r in runs),
    }


# ---- report ------------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda)
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    try:
        revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        revision = ""
    info["lctx_revision"] = revision or "unknown (no git checkout)"
    return info


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def ratio(value: float | None, base: float | None) -> str:
    return "–" if value is None or not base else f"{value / base:.2f}×"


def parity_lines(section: dict[str, Any], dtypes: list[str]) -> list[str]:
    checks = section.get("checks", [])
    if section.get("status") in (None, "not run"):
        return ["Parity: not run."]
    if section["status"] == "error":
        return [f"Parity: **error** — {section.get('detail', '')}"]
    lines = [f"Parity: **{section.get('passed', 0)} of {len(checks)} checks passed** (float32: |Δ logit| ≤ "
             f"{FP32_TOL:g}, bit-exact where stated, decoding = the recomputation's argmax; bfloat16: the float32 "
             f"reference within {BF16_SLACK:g}× the unpatched model's own bf16 error on the same input, see "
             "`BF16_SLACK`).", "",
             "| group | compared | " + " | ".join(dtypes) + " |", "|---|---|" + "---|" * len(dtypes)]
    for group, text in GROUP_TEXT.items():
        cells = []
        for dtype in dtypes:
            done = [c for c in checks if c["group"] == group and c["dtype"] in (dtype, "-")]
            ok = sum(c["passed"] for c in done)
            worst = max((c["error"] / c["bound"] for c in done if c["error"] is not None and c["bound"]),
                        default=None)
            cells.append(f"{ok}/{len(done)} pass" + (f", worst {worst:.2f} of bound" if worst is not None else "")
                         if done else "–")
        lines.append(f"| {group} | {text} | " + " | ".join(cells) + " |")
    failures = [c for c in checks if not c["passed"]]
    if failures:
        lines += ["", "Failed:", *(f"- {c['group']} {c['name']} [{c['dtype']}]: "
                                   + (c["detail"] or f"error {c['error']:.3g} > bound {c['bound']:.3g}")
                                   for c in failures[:40])]
        if len(failures) > 40:
            lines.append(f"- … and {len(failures) - 40} more (gpu-check.json)")
    return lines


def benchmark_lines(section: dict[str, Any]) -> list[str]:
    if section.get("status") in (None, "not run"):
        return ["Benchmark: not run."]
    if "model" not in section:
        return [f"Benchmark: **error** — {section.get('detail', '')}"]
    m = section["model"]
    lines = [f"Benchmark: random-weight Llama, {count(m['parameters'])} parameters (hidden {m['hidden_size']}, "
             f"{m['num_hidden_layers']} layers, {m['num_attention_heads']} heads / {m['num_key_value_heads']} KV "
             f"heads, vocab {m['vocab_size']}; weights {size(m['weights_bytes'])}), bfloat16, SDPA, "
             f"training length {length_label(m['train_len'])}. Prefill: one forward of the prompt into lctx's "
             f"reserved KV cache (last position's logits), as lctx's generation tasks run it; peak: "
             f"`torch.cuda.max_memory_allocated` during it, weights included. Decode: {section['steps']} greedy "
             f"steps with that cache. Median of up to {section['reps']} runs (one when a run takes over "
             f"{section['repeat_under_s']:g} s), after a warm-up; ratios to `none` at the same length.", "",
             "| variant | length | prefill | × none | peak memory | × none | decode tok/s | × none |",
             "|---|---|---|---|---|---|---|---|"]
    cells = section.get("cells", [])
    base = {c["length"]: c for c in cells if c["variant"] == "none" and c["status"] == "ok"}
    for c in cells:
        label = f"| `{c['variant']}` | {length_label(c['length'])} |"
        if c["status"] != "ok":
            lines.append(f"{label} {c['status']}: {c.get('detail', '')} | | | | | |")
            continue
        b = base.get(c["length"], {})
        peak, speed = c["peak_bytes"], c["decode_tokens_per_s"]
        lines.append(f"{label} {c['prefill_s']:.3f} s | {ratio(c['prefill_s'], b.get('prefill_s'))} | "
                     f"{'–' if peak is None else size(peak)} | {ratio(peak, b.get('peak_bytes'))} | "
                     f"{speed:.1f} | {ratio(speed, b.get('decode_tokens_per_s'))} |")
    fits = section.get("largest_fit") or {}
    if fits:
        lines += ["", "Largest length that ran: " + ", ".join(
            f"`{spec}` {length_label(n) if n else 'none'}" for spec, n in fits.items()) + " (of "
            + ", ".join(length_label(n) for n in section["lengths"]) + "; OOM, budget or skip above that)."]
    return lines


def markdown(result: dict[str, Any]) -> str:
    info = result["machine"]
    memory = f" ({info['memory_bytes'] / GiB:.1f} GiB, CUDA {info['cuda']}, capability {info['capability']})" \
        if "memory_bytes" in info else ""
    title = "One-command GPU check" + (" (dry run on CPU: tiny sizes, figures mean nothing)" if result["dry"] else "")
    lines = ["<!-- begin gpu -->", f"## {title}", "",
             f"`{result['command']}` — {result['started']}, {result['wall_s'] / 60:.1f} min, "
             + (f"exit {result['exit']}" if "exit" in result else "**did not finish** (outputs as of its last step)"),
             "", f"- Device: {info['device']}{memory}",
             f"- Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}; lctx at "
             f"{info['lctx_revision']}", "",
             *parity_lines(result["parity"], result["dtypes"]), "",
             *benchmark_lines(result["benchmark"]), "", "<!-- end gpu -->"]
    return "\n".join(lines) + "\n"


def exit_code(result: dict[str, Any]) -> int:
    if result["parity"].get("status") in ("failed", "error"):
        return 1
    if result["benchmark"].get("status") == "error":
        return 2
    return 0


def write(out: Path, result: dict[str, Any]) -> str:
    """Both outputs as they stand; rewritten after every step, so that a run killed midway leaves them."""
    result["wall_s"] = time.monotonic() - STARTED
    text = markdown(result)
    (out / "gpu-check.md").write_text(text, encoding="utf-8")
    (out / "gpu-check.json").write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    return text


# ---- main --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes: the same code paths in under a minute")
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"), help="output folder (default %(default)s)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 450; dry 120); the "
                                                     "benchmark skips lengths predicted not to fit")
    parser.add_argument("--only", choices=("parity", "benchmark"), help="run one section")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    sizes = DRY if args.dry else FULL
    device = torch.device(sizes.device)
    if args.dry:  # tiny tensors: a second thread only adds OpenMP waits, ten-fold on a CPU that other jobs share
        torch.set_num_threads(1)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --dry runs the same code on CPU at tiny sizes", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    LOG_FILE[:] = [args.out / "gpu-check.log"]
    LOG_FILE[0].write_text("", encoding="utf-8")
    budget = Budget(args.budget if args.budget is not None else sizes.budget_s)
    result: dict[str, Any] = {
        "command": shlex.join(["python", "scripts/gpu_check.py", *argv]), "dry": args.dry,
        "started": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(device),
        "budget_s": budget.total_s, "dtypes": [dtype_name(d) for d in sizes.dtypes],
        "parity": {"status": "not run"}, "benchmark": {"status": "not run"},
    }
    log(f"gpu_check on {result['machine']['device']}, budget {budget.total_s:.0f} s, out {args.out}")

    def report(**update: Any) -> None:
        result.update(update)
        write(args.out, result)

    if args.only in (None, "parity"):
        try:
            report(parity=gpu_parity.parity(sizes, device, lambda section: report(parity=section), log))
        except Exception as err:  # noqa: BLE001 (reported; the benchmark still runs)
            log(f"parity crashed: {traceback.format_exc()}")
            report(parity={"status": "error", "detail": short_error(err)})
        free(device)
    if args.only in (None, "benchmark"):
        try:
            report(benchmark=benchmark(sizes, device, budget, lambda section: report(benchmark=section)))
        except Exception as err:  # noqa: BLE001 (e.g. the generation helper cannot be imported)
            log(f"benchmark crashed: {traceback.format_exc()}")
            report(benchmark={"status": "error", "detail": short_error(err)})
    result["exit"] = exit_code(result)
    text = write(args.out, result)
    print(text, flush=True)
    log(f"done in {result['wall_s']:.0f} s, exit {result['exit']}; outputs in {args.out}")
    return result["exit"]


if __name__ == "__main__":
    sys.exit(main())
