"""The parity checks of the GPU check (scripts/gpu_check.py): lctx's patches against transformers' own RoPE
types and against attention written from the papers' formulas, identity and restore, left-padded batches, and
cached greedy decoding against recomputation; in float32 and bfloat16, each check failing alone.

A library of the script, importable on a bare machine (torch and transformers only): it takes the sizes of the
run and where to log, and reads its references from tests/ (tiny.py, references.py), which is not a package.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "tests", ROOT):  # tests/ for tiny.py and references.py; the checkout's lctx, benchmarks
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import references  # noqa: E402
import tiny  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
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


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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

# Model setups of the parity checks: name -> (architecture, rope_parameters of the checkpoint, config overrides).
SETUPS: dict[str, tuple[str, dict | None, dict]] = {
    **{arch: (arch, None, {}) for arch in tiny.ARCHS},
    "mistral+sliding": ("mistral", None, {"sliding_window": 24}),  # SDPA with a sliding-window mask
    "llama+yarn-checkpoint": ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings":
                                        TRAIN_LEN}, {"max_position_embeddings": 4 * TRAIN_LEN}),  # cos/sin scale
}


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

    def __init__(self, sizes: Any, device: torch.device, log: Callable[[str], None] = stderr) -> None:
        self.sizes, self.device, self.log = sizes, device, log
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
            self.log(f"FAIL {group} {name} [{dtype_name(dtype)}]: "
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


def parity(sizes: Any, device: torch.device, report: Callable[[dict], None],
           log: Callable[[str], None] = stderr) -> dict[str, Any]:
    """Run every parity group; float32 matmuls stay float32 (no TF32), so the CPU tests' bounds apply."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    p = Parity(sizes, device, log)
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
