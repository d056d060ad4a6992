#!/usr/bin/env python3
"""One-command GPU check of lctx (issue 16): parity on CUDA in fp32 and bf16, and a long-context benchmark.

A GPU machine is lent for minutes, once, without internet; this is everything to run there, from the repository
root::

    python scripts/gpu_check.py --out $OUT        # or: scripts/gpu-check.sh --out $OUT

It is meant to finish in under 8 minutes: ``--budget`` (default 450 s, counted from the start) bounds the
benchmark, which skips a length whose predicted time no longer fits; the 714 parity checks (tiny models,
launch-bound) are expected to take one to two minutes, not yet measured on a GPU. It needs only torch and
transformers: the checkout's ``lctx`` is imported from the repository (no install), and
``lctx.patches`` imports nothing else. The cached-decoding checks and the benchmark decode through lctx's own
generation helper (:func:`engine_greedy`); its module imports ``lctx.evals``, whose lm-eval bridge imports
``lm_eval`` at module level, so until that import is lazy a machine without lm-eval reports those parts as
errors (naming the missing module) and runs the rest.

1. **Parity** (tiny random decoders of tests/tiny.py; each check fails alone, an exception included):
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
import copy  # noqa: E402
import datetime as dt  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's lctx and benchmarks, not an installed copy

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask  # noqa: E402

from benchmarks import naive_rerope  # noqa: E402
from lctx import patches  # noqa: E402
from lctx.patches import rerope  # noqa: E402
from lctx.patches.arch import rope_info  # noqa: E402


def engine_greedy() -> Callable[..., list[int]]:
    """lctx's cached greedy decoding (prefill into a reserved KV cache, then one token a step): lctx.engine's,
    which imports no task (and so neither lm-eval nor LongBench's metric libraries)."""
    from lctx.engine import greedy

    return greedy


def _load(path: Path) -> ModuleType:
    """Import a helper file by path: tests/ is not a package, and pytest is not on the GPU machine."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny = _load(ROOT / "tests" / "tiny.py")
references = _load(ROOT / "tests" / "references.py")

TRAIN_LEN = tiny.TRAIN_LEN  # 64: the tiny models' training length
LONG = 4 * TRAIN_LEN + 7  # the frequency checks' length, well past the training length (as tests/test_patches.py)
FP32_TOL = 1e-5  # absolute, on logits: the CPU tests' bound
# bfloat16: a bf16 result is compared with the float32 reference (the exact answer), and may be at most
# BF16_SLACK times as far from it as the *unpatched* bf16 model is from the unpatched fp32 model on the same input
# (its weights rounded to bf16 and every op rounding to 8 bits: the error bf16 itself brings to this model).
# A patch adds a few roundings of its own (ReRoPE rotates queries and keys twice, at the cache position and by
# the near/far difference), so its error is of the same order, not equal: on CPU the worst bf16 check reaches
# 0.4 of this bound. The bf16 checks catch what only bf16 runs hit (a dtype cast, a bf16 kernel path) and gross
# mistakes (a far part weighted e^-0.5 too little: 5x the bound); smaller ones (e^-0.02) drown in bf16's own
# rounding and are the float32 checks' to catch, at 1e-5. Decoding: a bf16 token may differ from the float32
# recomputation's argmax only by a near-tie, within the same bound.
BF16_SLACK = 4.0
WINDOW = 16
ATTENTION_SPECS = (f"rerope:window={WINDOW}", f"leaky-rerope:window={WINDOW}:k=4",
                   f"self-extend:window={WINDOW}:group=4")
IDENTITY = ("none", "pi:factor=1", "ntk:alpha=1", "ntk-mixed:factor=1", "ntk-by-parts:factor=1", "yarn:factor=1",
            "llama3:factor=1", f"base:theta={tiny.THETA}")
BENCH_VARIANTS = ("none", "yarn:factor=16", "dynamic-ntk:factor=16", "rerope")
REPS = 3  # timed runs of a benchmark cell when one is cheap (median reported) ...
REPEAT_UNDER_S = 3.0  # ... i.e. when it took under this many seconds; otherwise one
RESERVE_S = 10.0  # budget kept for writing the outputs
GiB = 2**30

# Model setups of the parity checks: name -> (architecture, rope_parameters of the checkpoint, config overrides).
SETUPS: dict[str, tuple[str, dict | None, dict]] = {
    **{arch: (arch, None, {}) for arch in tiny.ARCHS},
    "mistral+sliding": ("mistral", None, {"sliding_window": 24}),  # SDPA with a sliding-window mask
    "llama+yarn-checkpoint": ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings":
                                        TRAIN_LEN}, {"max_position_embeddings": 4 * TRAIN_LEN}),  # cos/sin scale
}


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Return what a finished (or OOM-killed) cell held, so the next one starts from the weights alone."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def short_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


# ---- parity ------------------------------------------------------------------------------------------------


@dataclass
class Check:
    group: str
    name: str
    dtype: str
    passed: bool
    error: float | None = None  # the deviation measured (max |Δ logit|, or decoding's regret)
    bound: float | None = None
    detail: str = ""
    seconds: float = 0.0


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def ids(length: int, device: torch.device, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def logits(model: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kwargs).logits.float()


def deviation(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.float() - expected.float()).abs().max().item()


def on_device(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model's parameters in ``dtype`` on ``device``, its rotary buffers kept in float32.

    As ``from_pretrained(dtype=...)`` leaves them (``model.to(dtype)`` would round ``inv_freq`` to bf16 too).
    """
    model = copy.deepcopy(model).to(device)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


def left_padded(lengths: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded batch, its attention mask and the position ids generate() would give it."""
    width = max(lengths)
    x = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for row, n in enumerate(lengths):
        x[row, width - n:] = ids(n, torch.device("cpu"), seed=row + 2)[0]
        mask[row, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return x.to(device), mask.to(device), positions.to(device)


@contextlib.contextmanager
def chunk_size(rows: int) -> Iterator[None]:
    """Run the ReRoPE family with query chunks of ``rows`` rows (small: every input crosses chunk boundaries)."""
    saved = rerope.CHUNK_SIZE
    rerope.CHUNK_SIZE = rows
    try:
        yield
    finally:
        rerope.CHUNK_SIZE = saved


class Parity:
    """The parity checks; each one is run alone, so that a failure or an exception fails that check only."""

    def __init__(self, sizes: Sizes, device: torch.device) -> None:
        self.sizes, self.device = sizes, device
        self.checks: list[Check] = []
        self._models: dict[tuple[str, torch.dtype], nn.Module] = {}
        self._noise: dict[tuple, float] = {}
        self._references = 0

    # -- models --

    def base(self, setup: str) -> nn.Module:
        """The setup's tiny model in float32 on CPU: the weights every copy of it starts from."""
        arch, rope, overrides = SETUPS[setup]
        return tiny.tiny_model(arch, rope, **overrides)

    def model(self, setup: str, dtype: torch.dtype) -> nn.Module:
        key = (setup, dtype)
        if key not in self._models:
            self._models[key] = on_device(self.base(setup), self.device, dtype)
        return self._models[key]

    def transformers_reference(self, setup: str, rope: dict) -> nn.Module:
        """Same weights, float32, with transformers' own implementation of ``rope``."""
        arch, _, overrides = SETUPS[setup]
        longer = {} if rope.get("rope_type") == "dynamic" else {"max_position_embeddings": 8 * TRAIN_LEN}
        return on_device(tiny.same_weights(self.base(setup), arch, rope, **{**overrides, **longer}), self.device,
                         torch.float32)

    def formula_reference(self, setup: str, spec: str) -> nn.Module:
        """Same weights, float32, rotary made the identity and attention replaced by ``references.formula_attention``.

        Zeroed frequencies leave cos = attention_scaling, sin = 0: q and k arrive scaled as in the model.
        """
        arch, rope, overrides = SETUPS[setup]
        resolved = patches.parse(spec).resolve(TRAIN_LEN)
        reference = tiny.same_weights(self.base(setup), arch, rope or {}, **overrides)
        (rotary,) = [m for m in reference.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
        inv_freq = rotary.inv_freq.clone()
        rotary.inv_freq.zero_()
        self._references += 1
        name = f"gpu_check_formula_{self._references}"
        AttentionInterface.register(name, functools.partial(references.formula_attention, name=resolved.name,
                                                            params=resolved.kwargs, inv_freq=inv_freq,
                                                            train_len=TRAIN_LEN))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask)
        reference.config._attn_implementation = name
        return on_device(reference, self.device, torch.float32)

    # -- bounds --

    def bound(self, dtype: torch.dtype, setup: str, *inputs: torch.Tensor) -> float:
        """float32: the CPU tests' tolerance; bf16: BF16_SLACK × the unpatched model's own bf16 error on ``inputs``."""
        if dtype == torch.float32:
            return FP32_TOL
        key = (setup, dtype, tuple(x.cpu().numpy().tobytes() for x in inputs))
        if key not in self._noise:
            low, exact = self.model(setup, dtype), self.model(setup, torch.float32)
            self._noise[key] = max(deviation(logits(low, x), logits(exact, x)) for x in inputs)
        return BF16_SLACK * self._noise[key]

    def regret_bound(self, dtype: torch.dtype, setup: str, *inputs: torch.Tensor) -> float:
        """Decoding: float32 tokens must be the recomputation's argmax exactly; bf16 ones up to a near-tie."""
        return 0.0 if dtype == torch.float32 else self.bound(dtype, setup, *inputs)

    # -- running --

    def check(self, group: str, name: str, dtype: torch.dtype, fn: Callable[..., tuple[float, float]],
              *args: Any) -> None:
        """Run one check; ``fn(*args)`` returns (error, bound), and passes when error ≤ bound (NaN fails)."""
        began = time.monotonic()
        try:
            error, bound = fn(*args)
            passed, detail = bool(error <= bound), ""
        except Exception as err:  # noqa: BLE001 (every failure is a result of this check, reported)
            error = bound = None
            passed, detail = False, short_error(err)
        self.checks.append(Check(group, name, dtype_name(dtype), passed, error, bound, detail,
                                 time.monotonic() - began))
        if not passed:
            log(f"FAIL {group} {name} [{dtype_name(dtype)}]: "
                + (detail or f"error {error:.3g} > bound {bound:.3g}"))


# -- the checks: each returns (error, bound) --


def frequency_check(p: Parity, setup: str, spec: str, rope: dict, dtype: torch.dtype) -> tuple[float, float]:
    x = ids(LONG, p.device)
    model = p.model(setup, dtype)
    with patches.apply(model, spec, train_len=TRAIN_LEN):
        got = logits(model, x)
    expected = logits(p.transformers_reference(setup, rope), x)
    return deviation(got, expected), p.bound(dtype, setup, x)


def identity_check(p: Parity, setup: str, spec: str, dtype: torch.dtype, length: int) -> tuple[float, float]:
    """Logits under ``spec`` are bit-identical to the unpatched model's."""
    model, x = p.model(setup, dtype), ids(length, p.device)
    before = logits(model, x)
    with patches.apply(model, spec, train_len=TRAIN_LEN):
        got = logits(model, x)
    return deviation(got, before), 0.0


def restore_check(p: Parity, setup: str, spec: str, dtype: torch.dtype) -> tuple[float, float]:
    """A patch that changes the logits leaves the model bit-identical on exit."""
    model, x = p.model(setup, dtype), ids(LONG, p.device)
    before = logits(model, x)
    with patches.apply(model, spec, train_len=TRAIN_LEN):
        if torch.equal(logits(model, x), before):
            raise AssertionError("the patch changed nothing")
    return deviation(logits(model, x), before), 0.0


def formula_check(p: Parity, setup: str, spec: str, dtype: torch.dtype, length: int,
                  chunk: int) -> tuple[float, float]:
    x = ids(length, p.device)
    model = p.model(setup, dtype)
    with chunk_size(chunk), patches.apply(model, spec, train_len=TRAIN_LEN):
        got = logits(model, x)
    expected = logits(p.formula_reference(setup, spec), x)
    return deviation(got, expected), p.bound(dtype, setup, x)


def naive_check(p: Parity, dtype: torch.dtype) -> tuple[float, float]:
    """lctx's rerope against the benchmarks' two-matrix version (Su's formulation), at lctx's own chunk size."""
    setup, length = p.sizes.attention_long[0], p.sizes.long_length
    x, model = ids(length, p.device), p.model(setup, dtype)
    with chunk_size(p.sizes.long_chunk), patches.apply(model, f"rerope:window={WINDOW}", train_len=TRAIN_LEN):
        got = logits(model, x)
    exact = p.model(setup, torch.float32)
    with naive_rerope.apply(exact, window=WINDOW):
        expected = logits(exact, x)
    return deviation(got, expected), p.bound(dtype, setup, x)


def padding_check(p: Parity, setup: str, spec: str, dtype: torch.dtype) -> tuple[float, float]:
    """A left-padded batch gives each row the logits it gets alone (float32, for bf16)."""
    lengths = [100, 61, 9]
    x, mask, positions = left_padded(lengths, p.device)
    model, exact = p.model(setup, dtype), p.model(setup, torch.float32)
    rows = [x[row:row + 1, -n:] for row, n in enumerate(lengths)]
    with patches.apply(model, spec, train_len=TRAIN_LEN):
        batched = logits(model, x, attention_mask=mask, position_ids=positions)
    with patches.apply(exact, spec, train_len=TRAIN_LEN):
        alone = [logits(exact, r) for r in rows]
    error = max(deviation(batched[row:row + 1, -n:], a) for row, (n, a) in enumerate(zip(lengths, alone,
                                                                                           strict=True)))
    return error, p.bound(dtype, setup, *rows)


PROMPT, NEW = 40, 20  # a prompt longer than the window: decoding sees near and far keys


def regret(exact: torch.Tensor, tokens: torch.Tensor, suppressed: int) -> float:
    """How far below the best recomputed logit each chosen token is (0: the argmax), worst step.

    ``suppressed`` (EOS) is excluded: min_new_tokens keeps both generators from choosing it.
    """
    scores = exact.float().clone()
    scores[:, suppressed] = -torch.inf
    return (scores.max(-1).values - scores.gather(-1, tokens[:, None])[:, 0]).max().item()


def _generate(model: nn.Module, prompt: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)


def _lctx_greedy(model: nn.Module, prompt: torch.Tensor, new: int, chunk: int | None = None) -> torch.Tensor:
    eos = model.config.eos_token_id
    out = engine_greedy()(model, prompt[0].tolist(), new, {eos}, min_new_tokens=new, prefill_chunk=chunk)
    return torch.cat([prompt, torch.tensor([out], device=prompt.device)], dim=1)


GENERATORS: dict[str, Callable[[nn.Module, torch.Tensor, int], torch.Tensor]] = {
    "generate": _generate,  # transformers' DynamicCache
    "lctx greedy": _lctx_greedy,  # lctx's reserved cache, one prefill forward
    "lctx greedy, chunked prefill": functools.partial(_lctx_greedy, chunk=WINDOW - 3),  # cached multi-row queries
}


def decode_check(p: Parity, setup: str, spec: str, generator: str, dtype: torch.dtype) -> tuple[float, float]:
    """Cached greedy decoding chooses the tokens a recomputation without cache (float32) would choose."""
    model, exact = p.model(setup, dtype), p.model(setup, torch.float32)
    prompt = ids(PROMPT, p.device)
    seq_len = PROMPT + NEW  # length-dependent variants frozen at prompt + answer, as lctx's generation tasks do
    with patches.apply(model, spec, train_len=TRAIN_LEN, seq_len=seq_len):
        sequence = GENERATORS[generator](model, prompt, NEW)
    with patches.apply(exact, spec, train_len=TRAIN_LEN, seq_len=seq_len):
        recomputed = logits(exact, sequence)[0, PROMPT - 1:-1]
    error = regret(recomputed, sequence[0, PROMPT:], model.config.eos_token_id)
    return error, p.regret_bound(dtype, setup, sequence)


def padded_decode_check(p: Parity, setup: str, spec: str, dtype: torch.dtype) -> tuple[float, float]:
    """Cached ``generate`` on a left-padded batch chooses what each row's recomputation alone would."""
    lengths, new = [PROMPT, 23], 12
    x, mask, _ = left_padded(lengths, p.device)
    model, exact = p.model(setup, dtype), p.model(setup, torch.float32)
    with patches.apply(model, spec, train_len=TRAIN_LEN), torch.no_grad():
        batched = model.generate(x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=0)
    rows = [batched[row:row + 1, x.shape[1] - n:] for row, n in enumerate(lengths)]
    errors = []
    with patches.apply(exact, spec, train_len=TRAIN_LEN):
        for n, row in zip(lengths, rows, strict=True):
            errors.append(regret(logits(exact, row)[0, n - 1:-1], row[0, n:], model.config.eos_token_id))
    return max(errors), p.regret_bound(dtype, setup, *rows)


def parity_groups(p: Parity) -> list[tuple[str, Callable[[], None]]]:
    """The groups in order, each a function adding its checks to ``p``."""
    s, dtypes = p.sizes, p.sizes.dtypes

    def frequency() -> None:
        for setup in s.frequency:
            for spec, rope in references.frequency_references(rope_info(p.model(setup, torch.float32)).rotary_dim,
                                                                tiny.THETA, TRAIN_LEN):
                for dtype in dtypes:
                    p.check("frequency", f"{setup} {spec}", dtype, frequency_check, p, setup, spec, rope, dtype)

    def identity() -> None:
        for setup in s.identity:
            for dtype in dtypes:
                for spec in IDENTITY:
                    p.check("identity", f"{setup} {spec}", dtype, identity_check, p, setup, spec, dtype, LONG)
                for spec in ("none:logn=true", "dynamic-ntk:factor=4", "dynamic-yarn"):  # identity up to L
                    p.check("identity", f"{setup} {spec} at L", dtype, identity_check, p, setup, spec, dtype,
                            TRAIN_LEN)
                for spec in ("yarn:factor=4:logn=true", "dynamic-ntk:factor=4", "ntk-mixed:factor=8",
                             *ATTENTION_SPECS):
                    p.check("identity", f"{setup} restored after {spec}", dtype, restore_check, p, setup, spec,
                            dtype)

    def attention() -> None:
        for setup in s.attention:
            specs = ATTENTION_SPECS + ((f"rerope:window={WINDOW}:logn=true", "self-extend:window=5:group=3:logn=true")
                                       if setup == "llama" else ())
            for spec in specs:
                for dtype in dtypes:
                    for length in (12, 100):  # inside the window, and far past it (and Gemma-2's sliding window)
                        p.check("attention", f"{setup} {spec} {length} tokens, chunks of 7", dtype, formula_check,
                                p, setup, spec, dtype, length, 7)
                    if setup in s.attention_long:
                        p.check("attention", f"{setup} {spec} {s.long_length} tokens, chunks of {s.long_chunk}",
                                dtype, formula_check, p, setup, spec, dtype, s.long_length, s.long_chunk)
        for dtype in dtypes:
            p.check("attention", f"{s.attention_long[0]} rerope vs two-matrix baseline, {s.long_length} tokens",
                    dtype, naive_check, p, dtype)

    def padding() -> None:
        for setup in s.padding:
            for spec in (*ATTENTION_SPECS, "yarn:factor=4"):
                for dtype in dtypes:
                    p.check("padding", f"{setup} {spec}", dtype, padding_check, p, setup, spec, dtype)

    def decode() -> None:
        for setup in s.decode:
            for spec in (*ATTENTION_SPECS, "yarn:factor=4", "dynamic-ntk:factor=4"):
                for generator in GENERATORS:
                    for dtype in dtypes:
                        p.check("decode", f"{setup} {spec} {generator}", dtype, decode_check, p, setup, spec,
                                generator, dtype)
        for spec in ATTENTION_SPECS:
            for dtype in dtypes:
                p.check("decode", f"{s.decode[0]} {spec} generate, left-padded batch", dtype, padded_decode_check,
                        p, s.decode[0], spec, dtype)

    return [("frequency", frequency), ("identity", identity), ("attention", attention), ("padding", padding),
            ("decode", decode)]


GROUP_TEXT = {
    "frequency": "frequency variants vs transformers' own `rope_parameters`",
    "identity": "`none`, factor 1 (and dynamic below L) bit-exact; bit-exact restore after a patch",
    "attention": "ReRoPE family vs attention written from the formulas (every score materialised)",
    "padding": "left-padded batch vs each row alone",
    "decode": "cached greedy (generate, lctx greedy, chunked prefill, padded batch) vs recomputation",
}


def parity(sizes: Sizes, device: torch.device, report: Callable[[dict], None]) -> dict[str, Any]:
    """Run every parity group; float32 matmuls stay float32 (no TF32), so the CPU tests' bounds apply."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    p = Parity(sizes, device)
    section: dict[str, Any] = {"status": "running", "checks": []}
    for group, fn in parity_groups(p):
        before = len(p.checks)
        try:
            fn()
        except Exception as err:  # noqa: BLE001 (a group that cannot even enumerate its checks)
            p.checks.append(Check(group, "(group)", "-", False, detail=short_error(err)))
            log(f"parity {group} crashed: {traceback.format_exc()}")
        done = p.checks[before:]
        log(f"parity {group}: {sum(c.passed for c in done)}/{len(done)} passed")
        section["checks"] = [asdict(c) for c in p.checks]
        report(section)
    section["passed"] = sum(c.passed for c in p.checks)
    section["failed"] = len(p.checks) - section["passed"]
    section["status"] = "passed" if section["failed"] == 0 else "failed"
    return section


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
            report(parity=parity(sizes, device, lambda section: report(parity=section)))
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
