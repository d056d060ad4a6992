"""Where a transformers 5.x decoder keeps its rotary embedding and its attention call: the two seams lctx patches.

Every supported architecture (Llama, Mistral, Qwen2/3, Gemma 1/2, Phi-3, GPT-NeoX, OLMo/OLMo2) has one
rotary module holding ``inv_freq`` and ``attention_scaling`` whose ``forward(x, position_ids)`` returns
``(cos, sin)``, and attention modules that call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` with
already-rotated queries and keys and ``position_ids`` among the keyword arguments. Frequency variants swap the
rotary module's frequencies; attention variants install an attention function (see :func:`override_attention`).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

SUPPORTED_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox", "olmo", "olmo2",
)


class UnsupportedModelError(ValueError):
    """The model has no rotary embedding lctx can patch, or an architecture lctx does not support."""


@dataclass(frozen=True)
class RopeInfo:
    """What every variant reads from the model: base, rotary dimension, training length, original freqs."""

    arch: str
    theta: float
    rotary_dim: int
    head_dim: int
    train_len: int
    inv_freq: torch.Tensor  # the model's own (float32, rotary_dim // 2), as loaded
    attention_scaling: float


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that turn position ids into (cos, sin): those carrying an ``inv_freq`` buffer."""
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules: those owning a query projection and a layer index."""
    return [m for m in model.modules() if hasattr(m, "layer_idx")
            and any(hasattr(m, n) for n in ("q_proj", "query_key_value", "qkv_proj"))]


def training_length(config) -> int:
    """``original_max_position_embeddings`` when the config has it, else ``max_position_embeddings``."""
    params = getattr(config, "rope_parameters", None) or {}
    for value in (params.get("original_max_position_embeddings"),
                  getattr(config, "original_max_position_embeddings", None),
                  getattr(config, "max_position_embeddings", None)):
        if value:
            return int(value)
    raise UnsupportedModelError(
        f"cannot tell the training length of {config.model_type!r}: the config has no max_position_embeddings; "
        "pass --train-len N"
    )


def rope_info(model: nn.Module, train_len: int | None = None) -> RopeInfo:
    """Read base, rotary dim and training length, with clear errors for models lctx cannot patch."""
    config = text_config(model)
    arch = getattr(config, "model_type", type(model).__name__)
    rotaries = rotary_modules(model)
    if not rotaries:
        raise UnsupportedModelError(
            f"model type {arch!r} has no rotary position embedding (no module with inv_freq; e.g. GPT-2 uses "
            f"learned absolute positions), so RoPE variants do not apply. Supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if len(rotaries) > 1 or isinstance(getattr(config, "rope_parameters", {}).get("rope_type"), dict):
        raise UnsupportedModelError(
            f"model type {arch!r} has {len(rotaries)} rotary embeddings (per-layer-type RoPE), which lctx does "
            f"not patch yet. Supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    rotary = rotaries[0]
    params = config.rope_parameters or {}
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = getattr(rotary, "original_inv_freq", rotary.inv_freq).detach().float().cpu().clone()
    rotary_dim = 2 * inv_freq.numel()
    expected = int(head_dim * params.get("partial_rotary_factor", 1.0))
    if expected != rotary_dim:
        raise UnsupportedModelError(
            f"{arch}: rotary module has {inv_freq.numel()} frequencies but head_dim × partial_rotary_factor "
            f"= {expected}; lctx does not know how this model rotates"
        )
    return RopeInfo(
        arch=arch, theta=theta, rotary_dim=rotary_dim, head_dim=head_dim,
        train_len=int(train_len) if train_len else training_length(config),
        inv_freq=inv_freq, attention_scaling=float(getattr(rotary, "attention_scaling", 1.0) or 1.0),
    )


def default_inv_freq(theta: float, rotary_dim: int) -> torch.Tensor:
    """RoPE's θ_i = b^(-2i/d), written as transformers writes it so equal bases give equal bits."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


FrequencyFn = Callable[[int], tuple[torch.Tensor, float]]


@contextlib.contextmanager
def override_rotary(model: nn.Module, frequencies: FrequencyFn, seq_len: int | None,
                    length_dependent: bool) -> Iterator[None]:
    """Make the rotary module use ``frequencies(seq_len) -> (inv_freq, attention_scaling)``.

    Static variants set the buffer once. Length-dependent ones recompute it from the longest position of each
    call that starts a sequence (position 0); calls that continue a cached sequence keep the frequencies the
    cache was built with, so cached and uncached decoding agree. ``seq_len`` freezes the length instead.
    The model's own forward still computes cos/sin, so at factor 1 the logits are bit-identical; on exit the
    original buffer, scaling, rope_type and forward are put back.
    """
    (rotary,) = rotary_modules(model)
    saved = (rotary.inv_freq.detach().clone(), rotary.attention_scaling, getattr(rotary, "rope_type", None))
    had_forward = "forward" in rotary.__dict__
    original_forward = rotary.forward

    def install(length: int) -> None:
        inv_freq, scaling = frequencies(length)
        rotary.inv_freq.copy_(inv_freq.to(rotary.inv_freq.device, rotary.inv_freq.dtype))
        rotary.attention_scaling = scaling

    try:
        rotary.rope_type = "default"  # stop transformers' own dynamic updates from overwriting ours
        if length_dependent and seq_len is None:
            def forward(x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
                # A call starting past position 0 continues a cached sequence (decoding, chunked prefill):
                # keep the frequencies its cached keys were rotated with (the transformers #25104 bug).
                if int(position_ids.min()) == 0:
                    install(int(position_ids.max()) + 1)
                return original_forward(x, position_ids, *args, **kwargs)

            rotary.forward = forward
        else:
            install(seq_len or 0)
        yield
    finally:
        if "forward" in rotary.__dict__ and not had_forward:
            del rotary.forward
        rotary.inv_freq.copy_(saved[0])
        rotary.attention_scaling = saved[1]
        if saved[2] is not None:
            rotary.rope_type = saved[2]


# ---- attention seam ---------------------------------------------------------------------------------------

AttentionHook = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
_PREFIX = "lctx|"


def _dispatch(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Registered attention function: runs the hook installed on this module over its original function."""
    hook, original = module._lctx_attention
    return hook(module, query, key, value, attention_mask, original=original, **kwargs)


def _register(base: str) -> str:
    name = _PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _dispatch)
        mask = ALL_MASK_ATTENTION_FUNCTIONS.get(base, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    return name


@contextlib.contextmanager
def override_attention(model: nn.Module, hook: AttentionHook) -> Iterator[None]:
    """Route every attention call through ``hook(module, q, k, v, mask, original=fn, **kwargs)``.

    ``original`` is the attention function the model was using (SDPA, eager, flash…), and the mask is built
    exactly as for it, so a hook that only rescales the query keeps the model's kernels.
    """
    config = text_config(model)
    base = config._attn_implementation or "eager"
    if base.startswith(_PREFIX):
        raise RuntimeError("lctx: attention is already patched; leave the other patch first")
    modules = attention_modules(model)
    for module in modules:
        # "eager" is each architecture's own function (Gemma 2's applies softcapping), as the model looks it up
        eager = sys.modules[type(module).__module__].eager_attention_forward
        module._lctx_attention = (hook, ALL_ATTENTION_FUNCTIONS.get_interface(base, eager))
    configs = {id(c): c for c in (model.config, config)}.values()
    try:
        for c in configs:
            c._attn_implementation_internal = _register(base)
        yield
    finally:
        for c in configs:
            c._attn_implementation_internal = base
        for module in modules:
            del module._lctx_attention


def logn_scale(positions: torch.Tensor, train_len: int) -> torch.Tensor:
    """Su's log-n factor max(1, ln n / ln L) for 0-based ``positions`` (n = position + 1)."""
    n = positions.to(torch.float32) + 1.0
    return torch.clamp(torch.log(n) / math.log(train_len), min=1.0)


def query_positions(kwargs: dict, query: torch.Tensor) -> torch.Tensor:
    """Positions of the query rows, (batch, q_len); from ``position_ids`` that the decoder passes down."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise UnsupportedModelError(
            "this model does not pass position_ids to its attention function, which position-aware attention "
            "patches (logn, rerope, self-extend) need"
        )
    return position_ids.expand(query.shape[0], -1)
