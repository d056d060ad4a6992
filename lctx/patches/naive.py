"""The naive reference for attention-level variants on any architecture: the relative-position matrix, materialised.

Each variant maps query position i and key position j to an effective relative position P[i, j]. Query row i
therefore needs its keys at positions i − P[i, j]: one position per key, which the model's own code can apply.
So the sequence runs as a batch of T + 1 copies: copy i carries position ids ``i − P[i, ·]`` (the model's own
rotary and rotation put RoPE there, in its own layout, on its own rotary dimensions), the last copy the true
positions. At every attention module the model's own eager attention runs on all copies; row i of the output is
taken from copy i (from the last copy in a layer the variant leaves alone) and written into every copy, so all
copies carry the same hidden states into the next layer. Memory and time are quadratic: tiny models only.

Nothing of lctx's chunked attention, layout probe or cache rotation is used, so it checks them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lctx.patches.arch import is_local, text_config
from lctx.patches.seams import eager_function, override_attention


def effective_position(name: str, p: Mapping[str, Any], i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """P[i, j] from query positions i and key positions j (the variants' formulas, in float64)."""
    r, w = (i - j).double(), p["window"]
    if name == "rerope":
        far = torch.full_like(r, float(w))
    elif name == "leaky-rerope":
        far = w + (r - w) / p["k"]
    elif name == "self-extend":
        g = p["group"]
        far = (torch.div(i, g, rounding_mode="floor") + w - w // g - torch.div(j, g, rounding_mode="floor")).double()
    else:
        raise ValueError(f"no naive reference for {name!r}")
    return torch.where(r < w, r, far)


def changed_layer(model: nn.Module, module: nn.Module, layers: str | None) -> bool:
    """Whether the variant changes this attention module, from the config alone (``layers`` as in the spec)."""
    config = text_config(model)
    types = getattr(config, "layer_types", None)
    index = getattr(module, "layer_idx", None)
    layer_type = types[index] if types and index is not None and index < len(types) else None
    if layer_type is None and getattr(module, "sliding_window", None):
        layer_type = "sliding_attention"
    params = getattr(config, "rope_parameters", None) or {}
    per_type = bool(params) and all(isinstance(v, dict) or v is None for v in params.values())
    if layers is None:  # per-layer-type RoPE: the full-attention types, if it has any
        full_types = per_type and any(isinstance(v, dict) and not is_local(k) for k, v in params.items())
        return not (full_types and is_local(layer_type))
    return layers == "all" or (layers == "sliding") == is_local(layer_type)


def naive_logits(model: nn.Module, ids: torch.Tensor, name: str, params: Mapping[str, Any],
                 train_len: int, *, grad: bool = False) -> torch.Tensor:
    """Logits (1, T, vocab) of ``model`` under variant ``name`` with resolved ``params``, for ids (1, T).

    ``grad``: record autograd, so the gradient of a loss on them is the reference for training under the variant.
    """
    length = ids.shape[1]
    device = ids.device
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None]
    rel = effective_position(name, params, i, j)
    positions = torch.where(j <= i, i.double() - rel, j.double()).float()  # keys after i are masked anyway
    exact = bool((positions == positions.round()).all())
    positions = torch.cat([positions, torch.arange(length, device=device, dtype=torch.float32)[None]])
    if exact:
        positions = positions.long()
    rows = torch.arange(length, device=device)

    def hook(module, query, key, value, attention_mask, *, original, **kwargs):
        changed = changed_layer(model, module, params.get("layers"))
        if changed and params.get("logn"):
            n = rows.double() + 1
            factor = torch.clamp(torch.log(n) / math.log(train_len), min=1).to(query.dtype)
            query = torch.cat([query[:-1] * factor[:, None, None, None], query[-1:]])
        out, _ = eager_function(module)(module, query, key, value, attention_mask, **kwargs)
        picked = out[rows, rows] if changed else out[-1]  # (T, H, D): row i from copy i, or the true copy
        return picked[None].expand(out.shape[0], *picked.shape).contiguous(), None

    batch = ids.expand(length + 1, -1)
    configs = {id(c): c for c in (model.config, text_config(model))}.values()
    saved = [c._attn_implementation_internal for c in configs]
    try:
        for c in configs:  # eager: its masks are explicit (SDPA's may be None, leaving causality to the kernel)
            c._attn_implementation_internal = "eager"
        with torch.set_grad_enabled(grad), override_attention(model, hook):
            logits = model(input_ids=batch, position_ids=positions, attention_mask=torch.ones_like(batch),
                           use_cache=False).logits
    finally:
        for c, value in zip(configs, saved, strict=True):
            c._attn_implementation_internal = value
    return logits[-1:]
