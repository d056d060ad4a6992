"""The two seams lctx patches, installed and undone exactly: rotary frequencies and the attention function.

Frequency variants swap a rotary's buffers (:func:`override_rotary`); the model's own forward still computes
cos/sin from them, so at factor 1 the logits are bit-identical. Attention variants install an attention function
(:func:`override_attention`) that every attention module of the decoder reaches through
``ALL_ATTENTION_FUNCTIONS``, with the mask built exactly as for the function the model was using.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lctx.patches.arch import (
    Rotary,
    UnsupportedModelError,
    attention_modules,
    branches_on_implementation,
    rotary_modules,
    text_config,
)

FrequencyFn = Callable[[int], tuple[torch.Tensor, float]]


@contextlib.contextmanager
def rope_type_default(rotaries: Sequence[Rotary]) -> Iterator[None]:
    """Stop transformers' own dynamic/longrope updates from overwriting the frequencies of ``rotaries``."""
    saved = {}
    for r in rotaries:
        current = getattr(r.module, "rope_type", None)
        if id(r.module) not in saved:
            saved[id(r.module)] = (r.module, dict(current) if isinstance(current, dict) else current)
        if isinstance(current, dict):
            current[r.layer_type] = "default"
        elif current is not None:
            r.module.rope_type = "default"
    try:
        yield
    finally:
        for module, value in saved.values():
            if value is not None:
                module.rope_type = value


@contextlib.contextmanager
def override_rotary(rotaries: Sequence[tuple[Rotary, FrequencyFn]], seq_len: int | None,
                    length_dependent: bool) -> Iterator[None]:
    """Make each rotary use ``frequencies(seq_len) -> (inv_freq, attention_scaling)``.

    Static variants set the buffers once. Length-dependent ones recompute them from the longest position of each
    call that starts a sequence (position 0); calls that continue a cached sequence keep the frequencies the
    cache was built with, so cached and uncached decoding agree. ``seq_len`` freezes the length instead.
    On exit the original buffers, scalings, rope types and forwards are put back.
    """
    saved = [(r, r.inv_freq.detach().clone(), r.attention_scaling) for r, _ in rotaries]
    modules = {id(r.module): r.module for r, _ in rotaries}
    own_forward = {key: "forward" in module.__dict__ for key, module in modules.items()}

    def install(length: int, module: nn.Module | None = None) -> None:
        for rotary, frequencies in rotaries:
            if module is None or rotary.module is module:
                inv_freq, scaling = frequencies(length)
                rotary.inv_freq.copy_(inv_freq.to(rotary.inv_freq.device, rotary.inv_freq.dtype))
                rotary.set_attention_scaling(scaling)

    def wrap(module: nn.Module) -> None:
        original = module.forward

        def forward(x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
            # A call starting past position 0 continues a cached sequence (decoding, chunked prefill):
            # keep the frequencies its cached keys were rotated with (the transformers #25104 bug).
            if int(position_ids.min()) == 0:
                install(int(position_ids.max()) + 1, module)
            return original(x, position_ids, *args, **kwargs)

        module.forward = forward

    try:
        with rope_type_default([r for r, _ in rotaries]):
            if length_dependent and seq_len is None:
                for module in modules.values():
                    wrap(module)
            else:
                install(seq_len or 0)
            yield
    finally:
        for key, module in modules.items():
            if "forward" in module.__dict__ and not own_forward[key]:
                del module.forward
        for rotary, inv_freq, scaling in saved:
            rotary.inv_freq.copy_(inv_freq)
            rotary.set_attention_scaling(scaling)


# ---- attention seam ---------------------------------------------------------------------------------------

AttentionHook = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
_PREFIX = "lctx|"


def _dispatch(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Registered attention function: runs the hook installed on this module over its original function.

    A model whose layers do not pass ``position_ids`` down gets the ones its rotary module was last called with.
    """
    state = getattr(module, "_lctx_attention", None)
    if state is None:
        raise UnsupportedModelError(f"lctx: {type(module).__name__} calls the attention interface but was not "
                                    "found as an attention module, so it cannot be patched")
    hook, original, seen = state
    if kwargs.get("position_ids") is None and seen and seen[-1].shape[-1] == query.shape[2]:
        kwargs["position_ids"] = seen[-1]
    return hook(module, query, key, value, attention_mask, original=original, **kwargs)


@contextlib.contextmanager
def _track_positions(model: nn.Module, seen: list[torch.Tensor]) -> Iterator[None]:
    """Record the position ids each forward gives the rotary modules (the decoder computes them once)."""
    modules = rotary_modules(model)
    saved = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        original = module.forward

        def forward(x, position_ids, *args, _original=original, **kwargs):
            seen[:] = [position_ids]
            return _original(x, position_ids, *args, **kwargs)

        module.forward = forward
    try:
        yield
    finally:
        for module, forward in zip(modules, saved, strict=True):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _register(base: str) -> str:
    name = _PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _dispatch)
        mask = ALL_MASK_ATTENTION_FUNCTIONS.get(base, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    return name


def _configs(model: nn.Module) -> list[Any]:
    """The config objects an attention module may read ``_attn_implementation`` from (each once)."""
    found = {id(model.config): model.config, id(text_config(model)): text_config(model)}
    for module in attention_modules(model):
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            found[id(config)] = config
    return list(found.values())


def eager_function(module: nn.Module) -> Callable:
    """The module's own eager attention (Gemma 2's applies soft-capping, gpt-oss's its sinks), as it looks it up."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise UnsupportedModelError(f"{type(module).__name__} has no eager_attention_forward beside it, which lctx "
                                    "runs under an eager model")
    return eager


@contextlib.contextmanager
def override_attention(model: nn.Module, hook: AttentionHook,
                       modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """Route the attention calls of ``modules`` (default: all) through ``hook(module, q, k, v, mask, original=fn, …)``.

    ``original`` is the attention function the model was using (SDPA, eager, flash…), and the mask is built
    exactly as for it, so a hook that only rescales the query keeps the model's kernels. Modules left out run
    their original function.
    """
    config = text_config(model)
    base = config._attn_implementation or "eager"
    if base.startswith(_PREFIX):
        raise RuntimeError("lctx: attention is already patched; leave the other patch first")
    every = attention_modules(model)
    if not every:
        raise UnsupportedModelError(f"{getattr(config, 'model_type', type(model).__name__)}: no attention module "
                                    "calls ALL_ATTENTION_FUNCTIONS, the seam attention-level patches use")
    branching = sorted({type(m).__name__ for m in every if branches_on_implementation(type(m))})
    if branching:
        raise UnsupportedModelError(f"{', '.join(branching)} computes attention differently under another attention "
                                    "implementation's name (e.g. a sparse indexer's mask), so lctx cannot route its "
                                    "attention (logn, deepseek-yarn and attention-level variants)")
    chosen = {id(m) for m in (every if modules is None else modules)}
    seen: list[torch.Tensor] = []
    for module in every:
        original = ALL_ATTENTION_FUNCTIONS.get_interface(base, eager_function(module) if base == "eager" else None)

        def passthrough(mod, query, key, value, mask, *, original, **kwargs):
            return original(mod, query, key, value, mask, **kwargs)

        module._lctx_attention = (hook if id(module) in chosen else passthrough, original, seen)
    configs = _configs(model)
    try:
        for c in configs:
            c._attn_implementation_internal = _register(base)
        with _track_positions(model, seen):
            yield
    finally:
        for c in configs:
            c._attn_implementation_internal = base
        for module in every:
            del module._lctx_attention


def query_positions(kwargs: dict, query: torch.Tensor) -> torch.Tensor:
    """Positions of the query rows, (batch, q_len): ``position_ids`` as the decoder passes them down (or as
    :func:`_dispatch` filled them in from the rotary module's call)."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise UnsupportedModelError(
            "this model does not pass position_ids to its attention function, which position-aware attention "
            "patches (logn, rerope, self-extend) need"
        )
    if position_ids.dim() != 2:
        raise UnsupportedModelError(f"this model's position ids have {position_ids.dim()} axes (multimodal RoPE); "
                                    "position-aware attention patches (logn, rerope, self-extend) need one")
    return position_ids.expand(query.shape[0], -1)
