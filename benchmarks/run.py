"""``python -m benchmarks.run``: speed and memory of every RoPE variant against the unpatched model.

One command, one machine, one run: SmolLM2-135M (fp32, CPU, SDPA) on the first L tokens of the default corpus.

* ``prefill`` – time of one forward of the base model (final hidden states, no KV cache, no LM head: what
  lctx's perplexity computes before its chunked LM head) at several lengths, for every variant; the naive
  two-matrix ReRoPE at the short length. Each (variant, length) is warmed up once (a 512-token forward under
  the patch, plus one unpatched forward at the length), then timed ``--reps`` times, variants interleaved
  round by round so that load changes on a shared machine hit all of them alike; min and median are
  reported, ratios use the minimum. "none (A/A)" is the unpatched model timed again as a control: its ratio
  is the noise floor of the table.
* ``memory`` – each (variant, length) in a fresh subprocess: load, warm up (256-token forward under the
  patch), collect garbage and return freed heap to the OS, then one forward while a thread samples the
  process RSS every millisecond (cross-checked with getrusage's high-water mark). Reported: peak RSS during
  the forward minus RSS just before it (the loaded model and warm-up excluded), and the absolute peak.
* ``decode`` – a KV cache prefilled with the first C tokens under each variant, then single-token forwards,
  each timed, the cache cropped back to C after each so every step sees exactly C cached tokens.
* ``sweep`` – lctx's perplexity task over lengths 1k…8k (static variants: one forward at the longest length,
  chunked LM head) against one plain forward with full logits at the longest length, same variant.
* ``long`` – not in the default run: perplexity cells at 8k/16k/32k through ``lctx.execute.run``, one runner
  call per length so every record is one forward; its seconds and peak memory are tabulated from the records.

``--quick`` uses short lengths to check the script (written to results/BENCHMARKS.quick.md, never BENCHMARKS.md);
``--only SECTION`` runs some sections and replaces only their blocks in the output file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import inspect
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks import naive_rerope
from lctx import data, engine, evals, execute, memory, meter, models, patches, provenance, results, view
from lctx.options import RunOptions
from lctx.spec import format_length, parse_lengths

MODEL = models.DEFAULT_MODEL
BASELINE = "none"
CONTROL = "none (A/A)"  # the unpatched model timed a second time: the noise floor of a timing table
NAIVE = "naive-rerope"  # two-matrix ReRoPE (benchmarks.naive_rerope), window = training length / 4
FREQUENCY = ["pi:factor=4", "ntk:factor=4", "ntk-mixed:factor=4", "dynamic-ntk:factor=4", "ntk-by-parts:factor=4",
             "yarn:factor=4", "dynamic-yarn", "llama3:factor=4", "base:theta=400000", "yarn:factor=4:logn=true"]
ATTENTION = ["rerope", "leaky-rerope", "self-extend"]
SECTIONS = ("prefill", "rotary", "memory", "decode", "sweep", "long")
DEFAULT_SECTIONS = ("prefill", "rotary", "memory", "decode", "sweep")
RESULT_TAG = "BENCH_RESULT "  # a memory subprocess prints its result as one JSON line after this tag
GiB, MiB = 2**30, 2**20

TARGETS = {  # issues 3 and 7: ratio to the unpatched model, read at the settings' target lengths
    "frequency prefill": 1.02,
    "attention prefill": 1.4,
    "attention memory": 1.25,
    "attention decode": 1.3,
    "sweep": 1.1,
    "long memory frequency": 3.0,  # issue 8: GiB of process peak RSS at 32k
    "long memory attention": 3.5,
    "long time": 1.5,  # issue 8: a frequency variant's 32k cell over the unpatched one
}


@dataclass(frozen=True)
class Settings:
    prefill_lengths: tuple[int, ...]
    prefill_target: int
    reps: int
    memory_lengths: dict[int, str]  # length -> "all" variants or the "attention" family (with the baseline)
    memory_target: int
    naive_time_length: int  # timed in-process with the others; at longer lengths see the memory section
    decode_context: int
    decode_steps: int
    decode_rounds: int
    sweep_lengths: tuple[int, ...]
    sweep_reps: int
    long_lengths: tuple[int, ...]
    long_passkey_lengths: tuple[int, ...]
    long_chunk_lengths: tuple[int, ...]  # passkey again with --prefill-chunk, for none and rerope
    long_chunk: int = 4096
    long_tasks: tuple[str, ...] = ("ppl", "passkey")
    long_variants: tuple[str, ...] = ("none", "yarn:factor=4", "dynamic-ntk:factor=4", "rerope")
    sweep_variants: tuple[str, ...] = ("none", "yarn:factor=4", "rerope")  # the full run times two, for its budget
    quick: bool = False


FULL = Settings(prefill_lengths=(1024, 4096), prefill_target=4096, reps=2,
                memory_lengths={1024: "attention", 4096: "all", 16384: "attention"}, memory_target=16384,
                naive_time_length=1024, decode_context=8192, decode_steps=8, decode_rounds=3,
                sweep_lengths=tuple(range(1024, 8193, 1024)), sweep_reps=2, long_lengths=(8192, 16384, 32768),
                long_passkey_lengths=(16384, 32768), long_chunk_lengths=(16384,),
                sweep_variants=("none", "rerope"))
QUICK = Settings(prefill_lengths=(256, 512), prefill_target=512, reps=2,
                 memory_lengths={256: "attention", 512: "all", 1024: "attention"}, memory_target=1024,
                 naive_time_length=256, decode_context=1024, decode_steps=3, decode_rounds=2,
                 sweep_lengths=tuple(range(128, 1025, 128)), sweep_reps=1, long_lengths=(256, 512),
                 long_passkey_lengths=(512,), long_chunk_lengths=(512,), long_chunk=128,
                 long_variants=("none", "yarn:factor=4", "rerope"), quick=True)


def log(message: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# ---- the model, its tokens and its patches -------------------------------------------------------------------


def load() -> models.Loaded:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return models.load(MODEL, dtype="float32", device="cpu", attn="sdpa")


@functools.cache
def corpus() -> data.Corpus:
    """The default corpus (the Python reference manual), opened once so its tokenization is cached."""
    return data.open_corpus()


def tokens(loaded: models.Loaded, length: int) -> torch.Tensor:
    """The first ``length`` tokens of the default corpus, as lctx's ppl reads them."""
    (_, ids), = data.select(corpus(), loaded.tokenizer, length, 1).docs
    return torch.tensor(ids[:length])


@contextlib.contextmanager
def patched(loaded: models.Loaded, spec: str) -> Iterator[None]:
    """lctx's patch for ``spec``; the naive baseline for NAIVE; nothing for the baseline and its control."""
    if spec in (BASELINE, CONTROL):
        yield
    elif spec == NAIVE:
        with naive_rerope.apply(loaded.model, window=loaded.train_len // 4):
            yield
    else:
        with patches.apply(loaded.model, spec, loaded.train_len):
            yield


def prefill(loaded: models.Loaded, ids: torch.Tensor) -> None:
    """One forward of the base model over ``ids`` (no cache, no LM head), as lctx's ppl runs it."""
    engine.hidden_states(loaded.model, ids)


class Timing(NamedTuple):
    wall: float  # seconds
    cpu: float  # CPU seconds of this process, all threads: less sensitive than wall time to other jobs


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Timing:
    """Wall and CPU time of ``fn(*args, **kwargs)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def fastest(runs: list[Timing]) -> Timing:
    """The minimum wall time and the minimum CPU time of repeated runs."""
    return Timing(min(r.wall for r in runs), min(r.cpu for r in runs))


def median_wall(runs: list[Timing]) -> float:
    return statistics.median(r.wall for r in runs)


# ---- memory: peak RSS of one forward, in a fresh process ----------------------------------------------------


def _rss() -> Callable[[], int]:
    try:
        import psutil
    except ImportError:
        return lambda: int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    process = psutil.Process()
    return lambda: process.memory_info().rss


def _max_rss() -> int:
    """getrusage's high-water mark of this process, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def peak_rss(interval: float = 0.001) -> Iterator[dict[str, int]]:
    """Sample RSS while the block runs; yields a dict filled on exit with before/peak bytes."""
    rss = _rss()
    meter.free_memory(None)  # collect garbage and malloc_trim, so the block starts from what is live
    out = {"before": rss(), "max_rss_before": _max_rss()}
    peak = [out["before"]]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss())
        high = _max_rss()
        if high > out["max_rss_before"]:  # the block set a new high-water mark: a spike between samples counts
            peak[0] = max(peak[0], high)
        out["peak"] = peak[0]


def memory_child(spec: str, length: int) -> dict[str, Any]:
    """Runs in a fresh process: one forward at ``length`` under ``spec``, its peak RSS and time."""
    loaded = load()
    ids = tokens(loaded, length)
    with patched(loaded, spec), torch.inference_mode():
        prefill(loaded, ids[:256])
        with peak_rss() as mem:
            seconds = timed(prefill, loaded, ids).wall
    return {"spec": spec, "length": length, "seconds": seconds, "before": mem["before"], "peak": mem["peak"],
            "growth": mem["peak"] - mem["before"]}


def run_child(spec: str, length: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.run", "--threads", str(torch.get_num_threads()),
               "--child-memory", spec, str(length)]
    log(f"memory: {spec} at {length} (subprocess)")
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"spec": spec, "length": length, "error": f"exit {done.returncode}: {' | '.join(tail)}"}


# ---- sections -------------------------------------------------------------------------------------------------


@dataclass
class Section:
    name: str
    title: str
    lines: list[str] = field(default_factory=list)
    checks: list[tuple[str, str, float, bool | None]] = field(default_factory=list)  # what, got (text), target, ok

    def check(self, what: str, got: float | None, target: float, applies: bool = True, unit: str = "×") -> str:
        ok = None if got is None or not applies else got <= target
        self.checks.append((what, "–" if got is None else f"{got:.3f}{'' if unit == '×' else ' '}{unit}",
                            target, ok))
        return verdict(ok, target, unit)


def verdict(ok: bool | None, target: float, unit: str = "") -> str:
    unit = "" if unit == "×" else f" {unit}"
    return f"≤ {target:g}{unit}: " + {True: "pass", False: "**miss**", None: "n/a"}[ok]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(row) + " |" for row in rows]


def secs(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def size(value: float | None) -> str:
    return "–" if value is None else (f"{value / GiB:.2f} GiB" if abs(value) >= GiB else f"{value / MiB:.0f} MiB")


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}×"


def family(spec: str) -> str:
    if spec in (BASELINE, CONTROL):
        return "baseline"
    if spec == NAIVE:
        return "naive"
    return patches.parse(spec).variant.kind


def prefill_section(loaded: models.Loaded, settings: Settings) -> Section:
    section = Section("prefill", "Prefill time")
    specs = [BASELINE, CONTROL, *FREQUENCY, *ATTENTION]
    times: dict[tuple[str, int], list[Timing]] = {}
    with torch.inference_mode():
        for length in settings.prefill_lengths:
            ids = tokens(loaded, length)
            specs_here = specs + ([NAIVE] if length == settings.naive_time_length else [])
            log(f"prefill: warm-up at {length}")
            prefill(loaded, ids)
            for spec in specs_here:
                with patched(loaded, spec):
                    prefill(loaded, ids[:512])
            for rep in range(settings.reps):
                order = specs_here[rep % len(specs_here):] + specs_here[:rep % len(specs_here)]
                for spec in order:
                    with patched(loaded, spec):
                        times.setdefault((spec, length), []).append(timed(prefill, loaded, ids))
                log(f"prefill: round {rep + 1}/{settings.reps} at {length} done")
    header = ["variant", "family"]
    for length in settings.prefill_lengths:
        name = format_length(length)
        header += [f"{name} min (median)", f"{name} ratio", f"{name} CPU-time ratio"]
    header.append(f"target at {format_length(settings.prefill_target)}")
    rows = []
    for spec in [*specs, NAIVE]:
        kind = family(spec)
        row = [f"`{spec}`", kind]
        for length in settings.prefill_lengths:
            got = times.get((spec, length))
            if not got:
                row += ["–", "–", "–"]
                continue
            best, base = fastest(got), fastest(times[(BASELINE, length)])
            row += [f"{secs(best.wall)} ({secs(median_wall(got))})", fmt_ratio(ratio(best.wall, base.wall)),
                    fmt_ratio(ratio(best.cpu, base.cpu))]
        got = times.get((spec, settings.prefill_target))
        value = ratio(fastest(got).wall, fastest(times[(BASELINE, settings.prefill_target)]).wall) if got else None
        target = {"frequency": TARGETS["frequency prefill"], "attention": TARGETS["attention prefill"]}.get(kind)
        row.append(section.check(f"{spec} prefill at {settings.prefill_target}", value, target, not settings.quick)
                   if target else "")
        rows.append(row)
    section.lines += [
        f"One forward of the base model (final hidden states; no KV cache, no LM head), {settings.reps} timed runs "
        "per cell after a warm-up, variants interleaved; min (median) wall time, ratio of minima to `none` "
        "(targets are read on it); the CPU-time ratio (process CPU seconds, all threads) is the cross-check "
        "that other jobs on the machine disturb less. "
        f"`{NAIVE}` (two full score matrices) is timed at {format_length(settings.naive_time_length)} "
        "here; at longer lengths see the memory table (one run each).",
        "", *table(header, rows)]
    return section


def rotary_section(loaded: models.Loaded, settings: Settings) -> Section:
    """What a frequency variant adds to a forward: its rotary module's extra time, against the whole forward.

    A static variant only swaps the module's inv_freq buffer, so the forward runs the same operations on the same
    shapes; the rotary module (called once per forward) is the one place a variant can cost more. Timing it alone
    resolves differences far below the A/A noise of whole-forward timings.
    """
    from lctx.patches.arch import rope_info, rotary_modules
    from lctx.patches.logn import scale_query

    section = Section("rotary", "Frequency variants: the rotary module against the whole forward")
    length = settings.prefill_target
    ids = tokens(loaded, length)
    (rotary,) = rotary_modules(loaded.model)
    x = torch.zeros(1, length, loaded.model.config.hidden_size, dtype=loaded.dtype)
    positions = torch.arange(length)[None]
    calls = 50
    with torch.inference_mode():
        prefill(loaded, ids)
        forward = fastest([timed(prefill, loaded, ids) for _ in range(settings.reps)]).wall
        medians, extra = {}, {}
        config = loaded.model.config
        query = torch.zeros(1, config.num_attention_heads, length, rope_info(loaded.model).head_dim,
                            dtype=loaded.dtype)
        for spec in [BASELINE, *FREQUENCY]:
            with patched(loaded, spec):
                for _ in range(5):
                    rotary(x, positions)
                medians[spec] = median_wall([timed(rotary, x, positions) for _ in range(calls)])
            if patches.parse(spec).resolve(loaded.train_len).kwargs.get("logn"):  # logn also scales the queries
                one = median_wall([timed(scale_query, query, positions, loaded.train_len) for _ in range(calls)])
                extra[spec] = one * config.num_hidden_layers
    rows = []
    for spec in [BASELINE, *FREQUENCY]:
        bound = 1 + (medians[spec] + extra.get(spec, 0.0) - medians[BASELINE]) / forward
        rows.append([f"`{spec}`", f"{medians[spec] * 1e3:.3f} ms",
                     f"{extra[spec] * 1e3:.3f} ms" if spec in extra else "", f"{bound:.5f}×",
                     "" if spec == BASELINE else section.check(f"{spec} rotary bound at {length}", bound,
                                                               TARGETS["frequency prefill"], not settings.quick)])
    section.lines += [
        f"The model's rotary module called alone on {format_length(length)} positions ({calls} calls, "
        "median) under each variant, and the unpatched forward of the prefill table (min of "
        f"{settings.reps}: {secs(forward)}). Static variants only replace the module's `inv_freq` buffer, so the "
        "rest of the forward is the same operations on the same tensors; *forward ratio bound* = 1 + (variant's "
        "rotary time + its logn query scaling, if any − unpatched rotary time) / forward time. Dynamic variants "
        "recompute their frequencies inside this call, so it includes them.",
        "", *table(["variant", "rotary module, median", "logn query scaling (all layers)", "forward ratio bound",
                    f"target at {format_length(length)}"], rows)]
    return section


def memory_section(settings: Settings) -> Section:
    section = Section("memory", "Peak memory of one forward")
    measured: dict[tuple[str, int], dict[str, Any]] = {}
    plan = []
    for length, which in settings.memory_lengths.items():
        specs = [BASELINE, *ATTENTION] + (FREQUENCY if which == "all" else [])
        plan += [(spec, length) for spec in specs]
    lengths = sorted(settings.memory_lengths)
    for spec, length in plan:
        measured[(spec, length)] = run_child(spec, length)
    estimates: dict[int, str] = {}
    for length in lengths:  # the naive baseline where it fits, an estimate where it would not
        known = [(n, measured[(NAIVE, n)]) for n in lengths if n < length and "growth" in measured[(NAIVE, n)]]
        if known:
            n, m = known[-1]
            estimate = m["growth"] * (length / n) ** 2
            available = memory.available_memory(torch.device("cpu"))
            if available is not None and estimate > 0.8 * available:
                estimates[length] = (f"not run: ≈ {size(estimate)} estimated ({format_length(n)} growth × "
                                     f"{(length / n) ** 2:g}, quadratic) > 80% of the {size(available)} available")
                continue
        measured[(NAIVE, length)] = run_child(NAIVE, length)
    header = ["variant", "family"]
    for length in lengths:
        name = format_length(length)
        header += [f"{name} growth (abs. peak)", f"{name} ratio", f"{name} time (1 run)"]
    header.append(f"target at {format_length(settings.memory_target)}")
    rows = []
    for spec in [BASELINE, *FREQUENCY, *ATTENTION, NAIVE]:
        kind = family(spec)
        row = [f"`{spec}`", kind]
        for length in lengths:
            m = measured.get((spec, length), {})
            base = measured.get((BASELINE, length), {}).get("growth")
            if "growth" in m:
                row += [f"{size(m['growth'])} ({size(m['peak'])})", fmt_ratio(ratio(m["growth"], base)),
                        secs(m["seconds"])]
            elif "error" in m:
                row += [f"error: {m['error'][:80]}", "–", "–"]
            elif spec == NAIVE and length in estimates:
                row += [estimates[length], "–", "–"]
            else:
                row += ["–", "–", "–"]
        m = measured.get((spec, settings.memory_target), {})
        base = measured.get((BASELINE, settings.memory_target), {}).get("growth")
        row.append(section.check(f"{spec} memory at {settings.memory_target}", ratio(m.get("growth"), base),
                                 TARGETS["attention memory"], not settings.quick) if kind == "attention" else "")
        rows.append(row)
    baseline = measured.get((BASELINE, lengths[0]), {})
    section.lines += [
        "Each cell is a fresh process: load the model, warm up (256 tokens under the patch), collect garbage "
        "and `malloc_trim`, then one forward (as in the prefill table) while a thread samples RSS every 1 ms "
        "(cross-checked with `getrusage`'s high-water mark). *Growth* = peak RSS during the forward − RSS "
        "just before it; the ratio is growth / growth of `none`. *abs. peak* includes the loaded model "
        f"(RSS before the forward: {size(baseline.get('before'))} for `none`). Frequency variants run the "
        "model's own kernels, so they are measured at one length only. The time column is that single "
        "forward (no repeats; the prefill table has repeated timings).",
        "", *table(header, rows)]
    return section


def _cache_kwargs(model, cache) -> dict[str, Any]:
    """The KV cache argument under the name this transformers version uses (``cache``, formerly past_key_values)."""
    return {"cache": cache} if "cache" in inspect.signature(model.forward).parameters else {"past_key_values": cache}


def decode_section(loaded: models.Loaded, settings: Settings) -> Section:
    from transformers import DynamicCache

    section = Section("decode", "Cached decoding")
    model, context = loaded.model, settings.decode_context
    ids = tokens(loaded, context)[None]
    specs = [BASELINE, *ATTENTION]
    caches, first, prefill_seconds = {}, {}, {}
    steps: dict[str, list[Timing]] = {spec: [] for spec in specs}
    with torch.inference_mode():
        for spec in specs:
            log(f"decode: prefilling {context} tokens under {spec}")
            with patched(loaded, spec):
                cache = DynamicCache(config=model.config)
                start = time.perf_counter()
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **_cache_kwargs(model, cache))
                prefill_seconds[spec] = time.perf_counter() - start
                caches[spec], first[spec] = cache, out.logits[:, -1:].argmax(-1)
                for _ in range(2):  # warm-up steps
                    model(input_ids=first[spec], use_cache=True, **_cache_kwargs(model, cache))
                    cache.crop(-1)
        for round_ in range(settings.decode_rounds):
            for spec in specs:
                with patched(loaded, spec):
                    cache = caches[spec]
                    for _ in range(settings.decode_steps):
                        steps[spec].append(timed(model, input_ids=first[spec], use_cache=True,
                                                 **_cache_kwargs(model, cache)))
                        cache.crop(-1)
            log(f"decode: round {round_ + 1}/{settings.decode_rounds} done")
    base = fastest(steps[BASELINE])
    rows = []
    for spec in specs:
        best = fastest(steps[spec])
        value = ratio(best.wall, base.wall)
        rows.append([f"`{spec}`", secs(best.wall), secs(median_wall(steps[spec])), fmt_ratio(value),
                     fmt_ratio(ratio(best.cpu, base.cpu)), secs(prefill_seconds[spec]),
                     section.check(f"{spec} decode at {context}", value, TARGETS["attention decode"],
                                   not settings.quick) if spec != BASELINE else ""])
    n = settings.decode_rounds * settings.decode_steps
    section.lines += [
        f"A KV cache (`DynamicCache`) prefilled with the first {context} tokens under each variant, then "
        f"{n} single-token forwards per variant ({settings.decode_rounds} interleaved rounds of "
        f"{settings.decode_steps}, after 2 warm-up steps), each timed alone; the cache is cropped back to "
        f"{context} tokens after each step, so every step attends over exactly {context} cached tokens. "
        "The prefill column is the single cache-building forward (logits of the last position only).",
        "", *table(["variant", "per token, min", "median", "ratio (min)", "CPU-time ratio",
                    f"prefill {context} (1 run)", f"target at {format_length(context)}"], rows)]
    return section


def sweep_section(loaded: models.Loaded, settings: Settings) -> Section:
    section = Section("sweep", "Perplexity sweep over lengths")
    model = loaded.model
    lengths = list(settings.sweep_lengths)
    longest = max(lengths)
    ids = tokens(loaded, longest)[None]
    (task,) = evals.resolve("ppl")
    ctx = engine.Engine.from_loaded(loaded)
    cells = [evals.Cell(n) for n in lengths]
    forward_s: dict[str, list[Timing]] = {}
    sweep_s: dict[str, list[Timing]] = {}
    groups_n, ppl = {}, {}
    log("sweep: warm-up (tokenizes the corpus once)")
    task.run(ctx, patches.parse(BASELINE).resolve(loaded.train_len), [evals.Cell(128), evals.Cell(256)],
             lambda cost: None)
    for rep in range(settings.sweep_reps):
        for spec in settings.sweep_variants:
            resolved = patches.parse(spec).resolve(loaded.train_len)
            with patched(loaded, spec), torch.inference_mode():
                forward_s.setdefault(spec, []).append(timed(model, input_ids=ids, use_cache=False))
            groups = task.groups(resolved, cells)
            groups_n[spec] = len(groups)

            def sweep(groups=groups, resolved=resolved) -> None:
                for group in groups:
                    outcomes = task.run(ctx, resolved, group, lambda cost: None)
                    ppl.update({(resolved.canonical, c.length): o.metrics["ppl"] for c, o in outcomes.items()})

            sweep_s.setdefault(spec, []).append(timed(sweep))
            log(f"sweep: {spec} round {rep + 1}/{settings.sweep_reps} done")
    rows = []
    for spec in settings.sweep_variants:
        one, many = fastest(forward_s[spec]), fastest(sweep_s[spec])
        value = ratio(many.wall, one.wall)
        static = not patches.parse(spec).resolve(loaded.train_len).length_dependent
        canonical = patches.parse(spec).resolve(loaded.train_len).canonical
        rows.append([f"`{spec}`", secs(one.wall), secs(many.wall), fmt_ratio(value),
                     fmt_ratio(ratio(many.cpu, one.cpu)), str(groups_n[spec]), f"{ppl[(canonical, longest)]:.3f}",
                     section.check(f"{spec} sweep", value, TARGETS["sweep"], static and not settings.quick)])
    names = ",".join(format_length(n) for n in lengths)
    section.lines += [
        f"*One forward*: `model(ids).logits` over the first {format_length(longest)} tokens (logits for "
        f"every position, what a plain perplexity at {format_length(longest)} needs). *Sweep*: lctx's "
        f"`ppl` task (`lctx.evals.ppl`) computing all of {names} for the variant, as `lctx eval` groups them "
        f"(*forwards* = units of work; 1 = every length from one forward). Min of {settings.sweep_reps} "
        "run(s) each, after a warm-up that tokenizes the corpus.",
        "", *table(["variant", f"one {format_length(longest)} forward", "sweep", "ratio", "CPU-time ratio",
                    "forwards",
                    f"ppl at {format_length(longest)}", "target (static variants)"], rows)]
    return section


def long_section(settings: Settings, out: Path, force: bool) -> Section:
    """Issue 8's cells through ``lctx.execute``, one runner call per length, resumable from ``out``'s records."""
    section = Section("long", "Long contexts: perplexity and passkey to 4× the training length")
    from rich.console import Console

    console = Console(stderr=True)
    train_len = loaded_train_len()
    variants = list(settings.long_variants)
    with tempfile.TemporaryDirectory() as scratch:  # first forwards of a process allocate more: not in the table
        execute.run(RunOptions(models=[MODEL], ropes=variants, tasks=["ppl"], lengths=[128], out=Path(scratch),
                               dtype="float32", device="cpu", report=False), console)
    cell_options = RunOptions(models=[MODEL], ropes=variants, tasks=[], lengths=[],
                              task_defaults={"samples": 1, "depths": [0.5]}, out=out, force=force, dtype="float32",
                              device="cpu", report=False, argv=["python", "-m", "benchmarks.run", "--only", "long"])
    codes = {}
    for length in settings.long_lengths:
        tasks = [t for t in (["ppl", "passkey"] if length in settings.long_passkey_lengths else ["ppl"])
                 if t in settings.long_tasks]
        if not tasks:
            continue
        log(f"long: lctx eval --task {','.join(tasks)} --lengths {length} --rope {','.join(variants)} "
            f"--samples 1 --depths 0.5")
        codes[length] = execute.run(replace(cell_options, tasks=tasks, lengths=[length]), console).code
    chunk_out = out / f"prefill-chunk-{settings.long_chunk}"  # same cell keys (results are equal): own folder
    chunk_variants = [spec for spec in (BASELINE, "rerope") if spec in variants]
    chunk_lengths = [n for n in settings.long_chunk_lengths if n in settings.long_lengths]
    for length in chunk_lengths if chunk_variants and "passkey" in settings.long_tasks else []:
        log(f"long: lctx eval --task passkey --lengths {length} --rope {','.join(chunk_variants)} --samples 1 "
            f"--depths 0.5 --prefill-chunk {settings.long_chunk}")
        execute.run(replace(cell_options, ropes=chunk_variants, tasks=["passkey"], lengths=[length], out=chunk_out,
                            prefill_chunk=settings.long_chunk), console)
    store = results.Store(out)
    latest = {(r["task"], r["rope"], r["length"]): r for r in view.newest(store.read()) if r.get("model") == MODEL}
    revisions = _revisions(out)
    longest = max(settings.long_lengths)
    rows = []
    for task in ("ppl", "passkey"):
        for length in settings.long_lengths:
            if task == "passkey" and length not in settings.long_passkey_lengths:
                continue
            base = latest.get((task, patches.parse(BASELINE).resolve(train_len).canonical, length), {})
            for spec in variants:
                resolved = patches.parse(spec).resolve(train_len)
                record = latest.get((task, resolved.canonical, length))
                if record is None:
                    rows.append([f"`{spec}`", task, format_length(length),
                                 f"missing (exit {codes.get(length, '–')})", *["–"] * 8])
                    continue
                metrics = record.get("metrics") or {}
                value = (f"ppl {metrics['ppl']:.2f}" if task == "ppl" and metrics.get("ppl") else
                         f"{metrics['correct']}/{metrics['trials']}" if "correct" in metrics else "–")
                time_ratio = ratio(record.get("seconds"), base.get("seconds")) if record.get("status") == "ok" else None
                peak = record.get("process_peak_bytes")
                judged = task == "ppl" and length == longest and not settings.quick
                attention = resolved.variant.kind == "attention"
                memory_target = TARGETS["long memory attention" if attention else "long memory frequency"]
                verdicts = [section.check(f"{spec} {task} process peak at {format_length(length)}",
                                          None if peak is None else peak / GiB, memory_target, judged, "GiB")]
                if spec != BASELINE and not attention:
                    verdicts.append(section.check(f"{spec} {task} time at {format_length(length)}",
                                                  time_ratio, TARGETS["long time"], judged))
                rows.append([f"`{spec}`", task, format_length(length), record.get("status", "–"),
                             secs(record.get("seconds")), fmt_ratio(time_ratio) if spec != BASELINE else "",
                             size(record.get("peak_memory_bytes")), size(peak),
                             size(record.get("memory_estimate_bytes")), value, revisions.get(record["run_id"], "?"),
                             "; ".join(verdicts) if judged else ""])
    chunked = {(r["rope"], r["length"]): r for r in view.newest(results.Store(chunk_out).read())
               if r.get("model") == MODEL}
    chunk_revisions = _revisions(chunk_out)
    chunk_rows = []
    for length in chunk_lengths:
        for spec in chunk_variants:
            canonical = patches.parse(spec).resolve(train_len).canonical
            one, many = latest.get(("passkey", canonical, length), {}), chunked.get((canonical, length), {})
            metrics = many.get("metrics") or {}
            chunk_rows.append([f"`{spec}`", format_length(length), many.get("status", "missing"),
                               secs(many.get("seconds")), fmt_ratio(ratio(many.get("seconds"), one.get("seconds"))),
                               size(many.get("process_peak_bytes")), size(one.get("process_peak_bytes")),
                               size(many.get("memory_estimate_bytes")),
                               f"{metrics['correct']}/{metrics['trials']}" if "correct" in metrics else "–",
                               chunk_revisions.get(many.get("run_id"), "?"),
                               "same" if many.get("samples") and one.get("samples") and
                               [t["output"] for t in many["samples"]] == [t["output"] for t in one["samples"]]
                               else "–"])
    lengths = ",".join(format_length(n) for n in settings.long_lengths)
    passkey = ",".join(format_length(n) for n in settings.long_passkey_lengths)
    section.lines += [
        f"`lctx.execute.run`, i.e. `lctx eval --rope {','.join(variants)} --samples 1 --depths 0.5 --out {out}` "
        f"called once per length ({lengths}) with `--task ppl` (plus `passkey` at {passkey}), so every cell is "
        "one forward of its own (no forward shared across lengths); a warm-up call at 128 tokens first (a "
        "process's first forwards allocate more). The calls resume from the records in the output folder "
        "(`--long-force` recomputes). Figures are the records' own: *seconds* of the cell, *growth* = peak RSS "
        "growth over the cell's start (weights excluded), *process peak* = the whole process's peak RSS during "
        "the cell (weights, interpreter and tokenizer included; what the issue's targets and the 'figures to "
        "beat' measure), *estimate* = `lctx.memory`'s up-front estimate (what `--max-memory` compares). "
        "*Time ratio*: the cell's seconds over the unpatched (`none`, SDPA) cell of the same task and length "
        "(the first cell of each call, `none`'s ppl, also tokenizes the corpus: about a second). *lctx*: the git "
        "revision of the run that wrote the record (+: uncommitted changes); a rerun with `--long-force` and a "
        "subset of lengths or variants replaces only those records. "
        "ppl is over the whole window (PPL of all L − 1 predictions); passkey holds its KV cache (keys and "
        "values of all 30 layers: 1.41 GiB in fp32 at 32k) on top of what ppl needs.",
        "", *table(["variant", "task", "length", "status", "seconds", "time ratio", "growth", "process peak",
                    "estimate", "result", "lctx", f"targets at {format_length(longest)}"], rows)]
    if chunk_rows:
        section.lines += [
            "", f"Passkey again with `--prefill-chunk {settings.long_chunk}` (the prompt fed through the KV cache "
            f"{settings.long_chunk} tokens at a time; records in `{chunk_out}`), against the one-forward prefill "
            "of the table above:", "",
            *table(["variant", "length", "status", "seconds", "time vs one forward", "process peak",
                    "process peak, one forward", "estimate", "result", "lctx", "output"], chunk_rows)]
    return section


def _revisions(out: Path) -> dict[str, str]:
    """run_id → the git revision its manifest recorded (a resumed table can mix runs of different code)."""
    found = {}
    for path in out.glob("manifest-*.json"):
        git = json.loads(path.read_text(encoding="utf-8")).get("git") or {}
        found[path.stem.removeprefix("manifest-")] = (git.get("revision", "?")[:7]
                                                      + ("+" if git.get("dirty") else ""))
    return found


def loaded_train_len() -> int:
    """The default model's training length, from its config (no weights loaded)."""
    from lctx.patches.arch import training_length

    config = models.load_config(MODEL)
    return training_length(config.get_text_config() if hasattr(config, "get_text_config") else config)


# ---- the report ---------------------------------------------------------------------------------------------


def machine() -> list[str]:
    info = provenance.device_info(None)
    versions = provenance.package_versions()
    try:
        import psutil

        ram = size(psutil.virtual_memory().total)
    except ImportError:
        ram = size(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    git = provenance.git_revision() or {}
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return [
        f"- CPU: {info['name']}, {info['cpu_count']} logical cores, torch threads {torch.get_num_threads()}; "
        f"RAM {ram}; {platform.platform()}",
        f"- Python {versions['python']}, torch {versions['torch']}, transformers {versions['transformers']}; "
        f"lctx at {git.get('revision', 'unknown')[:12]}{' (uncommitted changes)' if git.get('dirty') else ''}",
        f"- Model: {MODEL}, float32, SDPA, training length {loaded_train_len()}; load average (1/5/15 min) "
        f"at the end of this section: {load} — other jobs shared the machine when this is above the core count",
    ]


def render(section: Section, command: str, started: str, seconds: float) -> str:
    lines = [f"<!-- begin {section.name} -->", f"## {section.title}", "",
             f"`{command}` — {started}, {seconds / 60:.1f} min", "", *machine(), "", *section.lines, ""]
    if section.checks:
        judged = [c for c in section.checks if c[3] is not None]
        misses = [f"{what} ({got} > {target:g})" for what, got, target, ok in judged if not ok]
        lines += [f"Targets: {len(judged) - len(misses)} of {len(judged)} met"
                  + (f"; missed: {'; '.join(misses)}" if misses else "")
                  + ("" if judged else " (none judged: --quick lengths are not the target lengths)") + ".", ""]
    return "\n".join(lines + [f"<!-- end {section.name} -->"])


HEADER = """# Benchmarks

Speed and memory of lctx's RoPE patches against the unpatched model (SDPA), measured by one command on one
machine. Every figure below comes from the command shown in its section; sections rerun with `--only`
replace only their own block. What each section measures is explained in its block and in the docstring of
`benchmarks/run.py`. Single-threaded runs (`--threads 1`) are the least disturbed by other jobs on a shared
machine (with two threads, OpenMP barriers turn other jobs' load into large swings of wall time); each block's
machine line says how many threads it used.
"""


def write(path: Path, blocks: dict[str, str]) -> None:
    """Replace each section's block in ``path`` (kept in SECTIONS order), keeping the other blocks."""
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    for name in SECTIONS:
        if name not in blocks:
            continue
        begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
        if begin in text and end in text:
            text = text[:text.index(begin)] + blocks[name] + text[text.index(end) + len(end):]
        else:
            later = [s for s in SECTIONS[SECTIONS.index(name) + 1:] if f"<!-- begin {s} -->" in text]
            at = text.index(f"<!-- begin {later[0]} -->") if later else len(text)
            text = text[:at].rstrip("\n") + "\n\n" + blocks[name] + "\n\n" + text[at:].lstrip("\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[],
                        help=f"sections to run, comma-separated or repeated: {', '.join(SECTIONS)} "
                             f"(default: {', '.join(DEFAULT_SECTIONS)}; 'long' runs only when named)")
    parser.add_argument("--quick", action="store_true", help="short lengths, to check the script quickly")
    parser.add_argument("--out", type=Path, help="report file (default BENCHMARKS.md; with --quick "
                                                 "results/BENCHMARKS.quick.md)")
    parser.add_argument("--long-lengths", help="lengths of the long section, e.g. 8k,16k,32k")
    parser.add_argument("--long-variants", help="RoPE specs of the long section, comma-separated")
    parser.add_argument("--long-out", type=Path, help="records directory of the long section "
                                                      "(default results/bench-long, or a temporary one with --quick)")
    parser.add_argument("--long-tasks", help="tasks of the long section: ppl, passkey or both (default)")
    parser.add_argument("--long-force", action="store_true", help="long section: recompute cells already "
                                                                   "recorded in --long-out")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own, one per core)")
    parser.add_argument("--child-memory", nargs=2, metavar=("SPEC", "LENGTH"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        spec, length = args.child_memory
        print(RESULT_TAG + json.dumps(memory_child(spec, int(length))), flush=True)
        return 0
    settings = QUICK if args.quick else FULL
    if args.long_lengths:
        settings = replace(settings, long_lengths=tuple(parse_lengths(args.long_lengths)))
    if args.long_variants:
        patches.parse_list(args.long_variants)  # a bad spec fails here, with the grammar
        settings = replace(settings, long_variants=tuple(v.strip() for v in args.long_variants.split(",")))
    if args.long_tasks:
        settings = replace(settings, long_tasks=tuple(t.strip() for t in args.long_tasks.split(",")))
    wanted = [s.strip() for item in args.only for s in item.split(",") if s.strip()] or list(DEFAULT_SECTIONS)
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        print(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    out = args.out or (Path("results/BENCHMARKS.quick.md") if args.quick else Path("BENCHMARKS.md"))
    command = shlex.join(["python", "-m", "benchmarks.run", *argv])
    loaded = load() if {"prefill", "rotary", "decode", "sweep"} & set(wanted) else None
    for name in SECTIONS:
        if name not in wanted:
            continue
        started, start = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), time.perf_counter()
        log(f"section {name}")
        if name == "prefill":
            section = prefill_section(loaded, settings)
        elif name == "rotary":
            section = rotary_section(loaded, settings)
        elif name == "memory":
            section = memory_section(settings)
        elif name == "decode":
            section = decode_section(loaded, settings)
        elif name == "sweep":
            section = sweep_section(loaded, settings)
        else:
            with contextlib.ExitStack() as stack:
                long_out = args.long_out or (Path(stack.enter_context(tempfile.TemporaryDirectory()))
                                             if args.quick else Path("results/bench-long"))
                section = long_section(settings, long_out, args.long_force)
        write(out, {name: render(section, command, started, time.perf_counter() - start)})
        gc.collect()
        log(f"section {name} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
