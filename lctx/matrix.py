"""The checks of the architecture matrix (``lctx archs``, tests/test_archs.py) on one tiny model.

- frequency parity: each lctx frequency variant against transformers' own ``rope_parameters`` of the same type,
  on the same weights (fp32 logits, ≤ 1e-5); ``none``/factor 1 bit-identical; leaving ``apply`` restores
  bit-exactly;
- attention exactness: ReRoPE, Leaky ReRoPE and SelfExtend against the naive reference
  (:mod:`lctx.patches.naive`, ≤ 1e-5); window ≥ length reproduces the model; cached greedy decoding equals
  recomputation; exit restores bit-exactly;
- the LM head: :func:`lctx.patches.arch.logits_processor` reproduces ``model(ids).logits``.

Each check records what it measured on a :class:`Row`; a variant :func:`lctx.patches.check` refuses up front is
recorded with its reason instead of being run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lctx import patches
from lctx.patches.arch import UnsupportedModelError, attention_modules, is_local, rotaries, text_config
from lctx.patches.naive import naive_logits
from lctx.patches.tiny import TRAIN_LEN, VOCAB, tiny_config

TOL = 1e-5
LONG = 2 * TRAIN_LEN + 7  # past the training length, across sliding windows (24) and chunks
ATTENTION_LEN = 100
WINDOW = 16
ATTENTION_SPECS = (f"rerope:window={WINDOW}", f"leaky-rerope:window={WINDOW}:k=4",
                   f"self-extend:window={WINDOW}:group=4")
IDENTITY = ("none", "pi:factor=1", "ntk:alpha=1", "yarn:factor=1", "llama3:factor=1", "deepseek-yarn:factor=1",
            "proportional", "none:logn=true")

# Settings applied to a type's tiny config: hybrids whose default has no RoPE attention layer in a small copy,
# and default configs transformers cannot build a model from (missing or inconsistent values).
MATRIX_SETTINGS: dict[str, dict[str, Any]] = {
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"], "num_hidden_layers": 2,
                         "position_embedding_type": "rope"},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "recurrent_gemma": {"num_hidden_layers": 3},
    "zamba2": {"use_mem_rope": True, "attention_hidden_size": 128, "attention_head_dim": 32, "kv_channels": 32,
               "num_query_groups": 4, "adapter_rank": 8},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "kv_n_heads": 1}},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2},
    "cohere_compass_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 4},
}
SCALING_KEYS = ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "short_factor",
                "long_factor", "low_freq_factor", "high_freq_factor", "truncate", "type", "short_mscale",
                "long_mscale")


@dataclass
class Row:
    """One model type's results: statuses "pass", "refused", "fail" or "untested", with reasons and errors."""

    model_type: str
    frequency: str = "untested"
    attention: str = "untested"
    head: str = "untested"
    frequency_reason: str = ""
    attention_reason: str = ""
    head_reason: str = ""
    layout: list[str] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    refused_specs: list[str] = field(default_factory=list)  # variants of a passing kind refused up front

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """One thread (tiny matrices: threads only synchronise, hundreds of times slower on a busy machine), and
    none of transformers' warnings about random weights and default configs."""
    logger = logging.getLogger("transformers")
    level, threads = logger.level, torch.get_num_threads()
    logger.setLevel(logging.ERROR)
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(level)
            torch.set_num_threads(threads)


def matrix_config(model_type: str):
    """The tiny config the matrix builds for ``model_type``: the type's defaults, its RoPE unscaled.

    A default config that ships a scaling (Apertus: llama3) is reset to its base RoPE (same θ, same partial
    rotary) so that factor 1 reproduces it; Gemma 4's proportional RoPE is a layout and stays.
    """
    from transformers import AutoConfig

    config = tiny_config(AutoConfig.for_model(model_type))
    d = config.to_dict()
    text = d["text_config"] if isinstance(d.get("text_config"), dict) else d
    for key, value in MATRIX_SETTINGS.get(model_type, {}).items():
        text[key] = {**text[key], **value} if isinstance(value, dict) and isinstance(text.get(key), dict) else value
    params = text.get("rope_parameters")

    def base(entry: dict) -> dict:
        if entry.get("rope_type", "default") in ("default", "proportional"):
            return entry
        return {k: v for k, v in entry.items() if k not in SCALING_KEYS} | {"rope_type": "default"}

    if params:
        text["rope_parameters"] = ({k: v if v is None else base(v) for k, v in params.items()} if _per_type(params)
                                   else base(params))
    return type(config).from_dict(d)


def build(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ---- frequency parity ---------------------------------------------------------------------------------------

def _per_type(params: dict) -> bool:
    return bool(params) and all(isinstance(v, dict) or v is None for v in params.values())


def frequency_cases(model) -> list[tuple[str, Callable[[dict], dict | None]]]:
    """(lctx spec, map from a rope_parameters entry to transformers' equivalent entry, or None: no equivalent)."""
    original = {"original_max_position_embeddings": TRAIN_LEN}
    pairs = {r.inv_freq.numel() for r in rotaries(model)}
    n = min(pairs)
    short = [1.0 + 0.05 * i for i in range(n)]
    long = [1.0 + 0.5 * i for i in range(n)]

    def keep(entry: dict) -> dict:  # θ, partial rotary and what else the model reads (Ministral 3's Llama-4 β)
        return {k: v for k, v in entry.items() if k not in SCALING_KEYS and k != "rope_type"}

    def scaled(extra: dict) -> Callable[[dict], dict | None]:
        def to(entry: dict) -> dict | None:
            if entry.get("rope_type") == "proportional":  # Gemma 4: transformers scales it only by its factor
                return {**entry, "factor": extra["factor"]} if extra["rope_type"] == "linear" else None
            return {**keep(entry), **extra}
        return to

    configs = [getattr(r.module, "config", None) for r in rotaries(model)]
    own_configs = any(c is not None and c is not text_config(model) for c in configs)

    def theta(new: Callable[[dict, int], float]) -> Callable[[dict], dict | None]:
        def to(entry: dict) -> dict | None:
            if entry.get("rope_type") == "proportional" or len(pairs) > 1 or own_configs:
                return None  # one d per entry; a θ the model reads from elsewhere (Granite-SWA's per-layer list)
            return {**keep(entry), "rope_type": "default", "rope_theta": new(entry, 2 * n)}
        return to

    def proportional(entry: dict) -> dict | None:
        if entry.get("partial_rotary_factor", 1.0) != 1.0 or entry.get("rope_type") == "proportional":
            return None
        return {**keep(entry), "rope_type": "proportional", "factor": 2.0, "partial_rotary_factor": 0.5}

    return [
        ("pi:factor=4", scaled({"rope_type": "linear", "factor": 4.0})),
        ("dynamic-ntk:factor=4", scaled({"rope_type": "dynamic", "factor": 4.0})),
        ("yarn:factor=4", scaled({"rope_type": "yarn", "factor": 4.0, **original})),
        ("yarn:factor=8:beta_fast=16:beta_slow=2",
         scaled({"rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0, **original})),
        ("ntk-by-parts:factor=4", scaled({"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.0, **original})),
        ("llama3:factor=8", scaled({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, **original})),
        ("deepseek-yarn:factor=4:mscale=1:mscale_all_dim=0.8",
         scaled({"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.8, **original})),
        (f"longrope:factor=4:short_factor={patches.format_value(short)}:long_factor={patches.format_value(long)}",
         scaled({"rope_type": "longrope", "factor": 4.0, "short_factor": short, "long_factor": long, **original})),
        ("proportional:factor=2:fraction=0.5", proportional),
        ("ntk:alpha=4", theta(lambda entry, d: entry["rope_theta"] * 4 ** (d / (d - 2)))),
        ("base:theta=500000", theta(lambda entry, d: 500000.0)),
    ]


def _new_rope(params: dict, to: Callable[[dict], dict | None]) -> dict | None:
    """``params`` with the entries a spec changes by default (full-attention types, if any) mapped by ``to``."""
    if not _per_type(params):
        return to(params)
    full = any(entry is not None and not is_local(key) for key, entry in params.items())
    new = {}
    for key, entry in params.items():
        changes = entry is not None and (not full or not is_local(key))
        new[key] = to(entry) if changes else entry
        if changes and new[key] is None:
            return None
    return new


def with_rope(config, to: Callable[[dict], dict | None], dynamic: bool):
    """A copy of ``config`` with its RoPE parameters mapped by ``to`` (None: transformers has no equivalent)."""
    d = config.to_dict()
    text = d["text_config"] if isinstance(d.get("text_config"), dict) else d
    new = _new_rope(text.get("rope_parameters") or {}, to)
    if new is None:
        return None
    text["rope_parameters"] = new
    if not dynamic:
        text["max_position_embeddings"] = 8 * TRAIN_LEN
    return type(config).from_dict(d)


def _reference_by_init(model, to: Callable[[dict], dict | None], dynamic: bool, length: int):
    """A copy of ``model`` whose rotaries hold what transformers' ``ROPE_INIT_FUNCTIONS`` compute for the new
    parameters at ``length``: for config classes that accept only some RoPE types (Phi-3: longrope)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    reference = copy.deepcopy(model)
    config = text_config(reference)
    new = _new_rope(config.rope_parameters, to)
    if new is None:
        return None
    object.__setattr__(config, "rope_parameters", new)  # past the config class's own validation
    if not dynamic:
        object.__setattr__(config, "max_position_embeddings", 8 * TRAIN_LEN)
    for rotary in rotaries(reference):
        entry = new.get(rotary.layer_type, new) if rotary.layer_type else new
        kind = entry.get("rope_type", "default")
        if kind == "default":
            continue
        kwargs = {"layer_type": rotary.layer_type} if rotary.layer_type else {}
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=length, **kwargs)
        rotary.inv_freq.copy_(inv_freq)
        rotary.set_attention_scaling(scaling)
        rope_type = getattr(rotary.module, "rope_type", None)
        if isinstance(rope_type, dict):
            rope_type[rotary.layer_type] = "default"
        elif rope_type is not None:
            rotary.module.rope_type = "default"
    return reference


def check_frequencies(model, config, row: Row) -> None:
    """Each frequency variant against transformers' own RoPE type on the same weights; identity and restore."""
    x = ids(LONG)
    before = logits(model, x)
    short = ids(TRAIN_LEN)
    before_short = logits(model, short)
    for spec in IDENTITY:
        x_used, expected = (short, before_short) if "logn" in spec else (x, before)
        if _refused(config, spec, row):
            continue
        with patches.apply(model, spec, TRAIN_LEN):
            got = logits(model, x_used)
        if not torch.equal(got, expected):
            row.failures.append(f"{spec} is not bit-identical ({max_error(got, expected):.2g})")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for spec, to in frequency_cases(model):
        dynamic = spec.startswith("dynamic")
        try:
            reference_config = with_rope(config, to, dynamic)
            if reference_config is None:
                continue
            with quiet():
                reference = build(reference_config)
            reference.load_state_dict(state)
            references = None
        except Exception:  # noqa: BLE001 - the config class takes only some RoPE types: transformers' init functions
            reference = None
            try:
                references = {n: _reference_by_init(model, to, dynamic, n) for n in (LONG, TRAIN_LEN)}
            except Exception as err:  # noqa: BLE001 - nor do transformers' functions for this config
                row.errors[f"{spec} (no reference: {type(err).__name__})"] = float("nan")
                continue
            if references[LONG] is None:
                continue
        if spec.startswith("deepseek-yarn") and (reference is None or _softmax_unscaled(model, reference)):
            continue  # transformers applies DeepSeek's softmax scale only in DeepSeek-style attention
        if _refused(config, spec, row):
            continue
        lengths = (x, short) if spec.startswith("longrope") else (x,)
        for inputs in lengths:
            try:
                expected = logits(reference or references[inputs.shape[1]], inputs)
            except Exception as err:  # noqa: BLE001 - transformers' own model fails with this rope type
                row.errors[f"{spec} (no reference: {type(err).__name__})"] = float("nan")
                continue
            with patches.apply(model, spec, TRAIN_LEN):
                got = logits(model, inputs)
            error = max_error(got, expected)
            row.errors[f"{spec}@{inputs.shape[1]}"] = error
            if not error <= TOL:
                row.failures.append(f"{spec} differs from transformers by {error:.2g} at length {inputs.shape[1]}")
        with patches.apply(model, spec, TRAIN_LEN):
            pass
        if not torch.equal(logits(model, x), before):
            row.failures.append(f"leaving {spec} does not restore the model")


def _refused(config, spec: str, row: Row) -> bool:
    """Whether :func:`lctx.patches.check` refuses ``spec`` (then recorded with its reason, not run)."""
    reason = refusal(config, spec)
    if reason is not None:
        row.refused_specs.append(f"{spec.split(':')[0]}: {reason}")
    return reason is not None


def _softmax_unscaled(model, reference) -> bool:
    mine = [getattr(m, "scaling", None) for m in attention_modules(model)]
    theirs = [getattr(m, "scaling", None) for m in attention_modules(reference)]
    return mine == theirs


# ---- attention exactness -----------------------------------------------------------------------------------

def check_attention(model, row: Row) -> None:
    """ReRoPE, Leaky ReRoPE and SelfExtend against the naive reference; identity window; cache; restore."""
    x = ids(ATTENTION_LEN)
    before = logits(model, x)
    for spec in ATTENTION_SPECS:
        resolved = patches.parse(spec).resolve(TRAIN_LEN)
        expected = naive_logits(model, x, resolved.name, resolved.kwargs, TRAIN_LEN)
        with patches.apply(model, resolved, TRAIN_LEN):
            got = logits(model, x)
        error = max_error(got, expected)
        row.errors[spec] = error
        if not error <= TOL:
            row.failures.append(f"{spec} differs from the naive reference by {error:.2g}")
        if not torch.equal(logits(model, x), before):
            row.failures.append(f"leaving {spec} does not restore the model")
    with patches.apply(model, f"rerope:window={10 * ATTENTION_LEN}", TRAIN_LEN):
        error = max_error(logits(model, x), before)
    row.errors["rerope:window≥length"] = error
    if not error <= TOL:
        row.failures.append(f"rerope with a window past the length differs from the model by {error:.2g}")
    if not _decodes_consistently(model, None):
        row.errors["cached decoding (the model's own differs from recomputation: not compared)"] = float("nan")
    elif not _decodes_consistently(model, ATTENTION_SPECS[0]):
        row.failures.append("cached greedy decoding differs from recomputation under rerope")


def _decodes_consistently(model, spec: str | None, new: int = 8) -> bool:
    """Whether greedy decoding with the KV cache equals recomputing every step (under ``spec``, if given)."""
    prompt = ids(40)
    with patches.apply(model, spec or "none", TRAIN_LEN), torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
        recomputed = prompt
        for _ in range(new):
            step = model(input_ids=recomputed, use_cache=False).logits[:, -1:].argmax(-1)
            recomputed = torch.cat([recomputed, step], dim=1)
    return torch.equal(cached, recomputed)


# ---- the LM head ---------------------------------------------------------------------------------------------

def check_head(model, row: Row) -> None:
    """``logits_processor(model)(lm_head(hidden))`` against ``model(ids).logits``."""
    x = ids(TRAIN_LEN)
    try:
        process = patches.arch.logits_processor(model)
        with torch.no_grad():
            hidden = patches.arch.base_model(model)(input_ids=x, use_cache=False).last_hidden_state
            got = process(model.get_output_embeddings()(hidden))
    except UnsupportedModelError as err:
        row.head, row.head_reason = "refused", str(err)
        return
    error = max_error(got, logits(model, x))
    row.errors["head"] = error
    row.head = "pass" if error <= TOL else "fail"
    if row.head == "fail":
        row.failures.append(f"the chunked LM head differs from the model's logits by {error:.2g}")


# ---- one row -----------------------------------------------------------------------------------------------


def refusal(config, spec: str) -> str | None:
    try:
        patches.check(config, spec, TRAIN_LEN)
    except UnsupportedModelError as err:
        return str(err)
    return None
