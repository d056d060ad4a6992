"""Up-front estimate of a cell's peak memory, and parsing of ``--max-memory``.

Why: a 32k cell runs for many minutes before it can fail, and an OOM on CPU may take the machine down with it
rather than raise. The estimate is read from the model's config alone (no weights loaded), so the runner can
print it before starting and skip cells over a ``--max-memory`` budget instead of attempting them.

What is counted, for one sequence of L tokens at b bytes per element (inference mode, nothing kept for backward):
- weights: every parameter of a decoder (embeddings, attention, gated MLP, norms, LM head unless tied);
- activations: the largest live set of one layer: the residual stream (2·L·d), the normed input (L·d) and
  RoPE's cos/sin (2·L·head_dim), the position ids,
  plus either the MLP's gate, up and product (3·L·I) and its output (L·d), or attention's q, k, v, their
  rotated copies and output — whichever is larger. Layers run one after another, so one layer's worth;
- KV cache (generation tasks): keys and values of every layer, 2·layers·L·kv_dim·b, reserved once for the
  prompt and the answer (``lctx.engine.reserved_cache``: decoding steps write into it, never copy it);
- logits: fp32, for the positions kept (``loss``: chunks of ``lctx.engine.CHUNK`` rows, with
  log-softmax, ×2; ``prefill``: the last position; ``logits``: every position, ×2);
- attention scores: ``eager`` holds heads·L² fp32 scores and their softmax; SDPA's fused kernels and the
  ReRoPE family's chunked path hold at most a chunk of rows against all keys (its band mask).
The total counts live tensors (weights included). A process's RSS is larger: the interpreter, torch and the
tokenizer (about 0.6 GiB for SmolLM2 here) and blocks the allocator keeps; BENCHMARKS.md's long-context table
puts both side by side.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from lctx.engine import CHUNK as LOSS_CHUNK
from lctx.patches.rerope import CHUNK_SIZE as ATTENTION_CHUNK

GiB = 2**30
UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
         "g": GiB, "gb": 10**9, "gib": GiB, "t": 2**40, "tb": 10**12, "tib": 2**40}
PROFILES = ("loss", "prefill", "logits")  # what a task keeps of the final layer (see the module docstring)


class SizeError(ValueError):
    """A --max-memory value that cannot be parsed."""


def parse_size(text: str) -> int:
    """'3GiB', '2.5G', '800MiB', '24gb' → bytes (G/GiB are binary, GB decimal); raises with the valid forms."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in UNITS:
        raise SizeError(f"--max-memory {text!r} is not a size: use a number with a unit, e.g. 3GiB, 2.5G, "
                        "800MiB, 24GB (K/M/G/T and KiB/MiB/GiB/TiB are binary, KB/MB/GB/TB decimal)")
    value = float(match.group(1)) * UNITS[unit]
    if value <= 0:
        raise SizeError(f"--max-memory {text!r} must be positive")
    return int(value)


def format_size(n: float | None) -> str:
    """Bytes in the largest binary unit under 1024 of it: '512 B', '3.5 MiB', '2.8 GiB'; None → '?'."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def available_memory(device: torch.device) -> int | None:
    """Bytes free now: the CUDA device's free memory, or the system RAM available; None when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        try:
            import psutil
        except ImportError:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return int(psutil.virtual_memory().available)
    except (OSError, ValueError, RuntimeError):  # no figure for what is free is not an error
        return None


@dataclass(frozen=True)
class Estimate:
    weights: int
    activations: int
    cache: int
    logits: int
    attention: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.cache + self.logits + self.attention

    def describe(self) -> str:
        parts = [("weights", self.weights), ("activations", self.activations), ("KV cache", self.cache),
                 ("logits", self.logits), ("attention", self.attention)]
        return f"≈{format_size(self.total)} (" + ", ".join(f"{name} {format_size(n)}" for name, n in parts if n) + ")"


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def shape(config: Any) -> dict[str, int]:
    """The sizes the estimate needs, from a transformers config (its text config for multimodal models)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = int(_get(text, "hidden_size", "n_embd", "d_model"))
    heads = int(_get(text, "num_attention_heads", "n_head"))
    head_dim = int(_get(text, "head_dim", default=0) or d // heads)
    kv_heads = int(_get(text, "num_key_value_heads", default=heads))
    return {"d": d, "layers": int(_get(text, "num_hidden_layers", "n_layer")), "heads": heads, "head_dim": head_dim,
            "q_dim": heads * head_dim, "kv_dim": kv_heads * head_dim,
            "inter": int(_get(text, "intermediate_size", "n_inner", default=0) or 4 * d),
            "vocab": int(_get(text, "vocab_size")), "tied": bool(_get(text, "tie_word_embeddings", default=True))}


_PARAMETERS: dict[str, int] = {}  # by config JSON: building even a meta model takes a moment


def parameters(config: Any) -> int:
    """Parameter count: the model built on the meta device, or else :func:`formula_parameters`."""
    try:
        key = config.to_json_string(use_diff=False)
        if key not in _PARAMETERS:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):  # shapes only: nothing is allocated
                model = AutoModelForCausalLM.from_config(config)
            _PARAMETERS[key] = sum(p.numel() for p in model.parameters())  # tied weights once
        return _PARAMETERS[key]
    except Exception:  # noqa: BLE001 - an architecture transformers cannot build from its config alone
        return formula_parameters(config)


def formula_parameters(config: Any) -> int:
    """Parameter count of a gated-MLP decoder without biases (Llama, Mistral): embeddings, layers, norms, head."""
    s = shape(config)
    d, q, kv, inter = s["d"], s["q_dim"], s["kv_dim"], s["inter"]
    layer = d * q + 2 * d * kv + q * d + 3 * d * inter + 2 * d
    return s["vocab"] * d * (1 if s["tied"] else 2) + s["layers"] * layer + d


def estimate(config: Any, length: int, *, dtype_bytes: int = 4, profile: str = "prefill",
             attention: str = "sdpa", chunked: bool = False, batch: int = 1,
             prefill_chunk: int | None = None) -> Estimate:
    """Peak memory of one forward over ``batch`` × ``length`` tokens; ``chunked``: the ReRoPE family's attention.

    ``prefill_chunk`` (profile ``prefill``): the prompt goes through the KV cache that many rows at a time, so
    activations are a chunk's, plus the chunk's mask against every key (counted as fp32).
    """
    if profile not in PROFILES:
        raise ValueError(f"memory profile {profile!r}: choose one of {', '.join(PROFILES)}")
    s = shape(config)
    n, b = length, dtype_bytes
    rows = min(n, prefill_chunk) if profile == "prefill" and prefill_chunk else n
    residual = 3 * rows * s["d"] + 2 * rows * s["head_dim"]  # with the cos/sin tables every layer reads
    mlp = 3 * rows * s["inter"] + rows * s["d"]
    attn = 2 * rows * s["q_dim"] + 3 * rows * s["kv_dim"] + rows * s["q_dim"]
    if rows < n:  # the later chunks' keys and values are the cache's
        attn = 3 * rows * s["q_dim"]
    logits_rows = {"loss": min(n, LOSS_CHUNK) * 2, "prefill": 1, "logits": n * 2}[profile]
    if attention == "eager" and not chunked:
        scores = 2 * s["heads"] * rows * n * 4
    else:
        scores = min(rows, ATTENTION_CHUNK) * n * 4 if chunked else 0
    if rows < n:
        scores += rows * n * 4  # the chunk's causal mask against the cache
    small = rows * 8 + 2**16  # position ids (int64) and a few small tensors
    activations = batch * ((residual + max(mlp, attn)) * b + small)
    cache = batch * 2 * s["layers"] * n * s["kv_dim"] * b if profile == "prefill" else 0
    return Estimate(weights=parameters(config) * b, activations=activations, cache=cache,
                    logits=batch * logits_rows * s["vocab"] * 4, attention=batch * scores)
