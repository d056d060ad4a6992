"""Independent references shared by the tests and ``scripts/gpu_check.py`` (which runs without pytest).

Written from the papers and transformers' documented ``rope_parameters``, not from lctx's code: the ReRoPE family
as an attention that rotates every (query, key) pair by its own effective relative position, materialised, and
the frequency variants as the transformers RoPE types that give the same model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def frequency_references(rotary_dim: int, theta: float, train_len: int) -> list[tuple[str, dict]]:
    """(lctx spec, transformers ``rope_parameters`` giving the same model); ntk and base are a changed
    ``rope_theta`` (NTK-aware: θ·α^(d/(d−2)))."""
    d = rotary_dim
    original = {"original_max_position_embeddings": train_len}
    return [
        ("pi:factor=4", {"rope_type": "linear", "factor": 4.0}),
        ("linear:factor=2.5", {"rope_type": "linear", "factor": 2.5}),
        ("dynamic-ntk:factor=4", {"rope_type": "dynamic", "factor": 4.0}),
        ("yarn:factor=4", {"rope_type": "yarn", "factor": 4.0, **original}),
        ("yarn:factor=8:beta_fast=16:beta_slow=2", {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0,
                                                    "beta_slow": 2.0, **original}),
        ("ntk-by-parts:factor=4", {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.0, **original}),
        ("llama3:factor=8", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, **original}),
        ("ntk:alpha=4", {"rope_theta": theta * 4 ** (d / (d - 2))}),
        ("ntk:factor=3", {"rope_theta": theta * 3 ** (d / (d - 2))}),
        ("base:theta=500000", {"rope_theta": 500000.0}),
    ]


def effective_position(name: str, p: dict, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The relative position P[i, j] each variant gives query position i and key position j (the papers'
    formulas: ReRoPE clips at the window, Leaky ReRoPE continues with slope 1/k, SelfExtend groups by g)."""
    r, w = i - j, p["window"]
    if name == "rerope":
        far = torch.full_like(r, w, dtype=torch.float64)
    elif name == "leaky-rerope":
        far = w + (r - w) / p["k"]
    else:
        g = p["group"]
        far = (torch.div(i, g, rounding_mode="floor") + w - w // g) - torch.div(j, g, rounding_mode="floor")
    return torch.where(r < w, r.double(), far.double())


def formula_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, *, name: str,
                      params: dict, inv_freq: torch.Tensor, train_len: int, softcap: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Eager attention on unrotated q, k: score(i, j) = (R(P[i, j]) q_i) · k_j, as R(i)q · R(j)k = R(i−j)q · k.

    Every (query, key) pair gets its own rotation, materialised: no chunks, no merges, nothing shared with lctx.
    Registered with transformers' ``AttentionInterface`` on a model whose rotary is made the identity.
    """
    pos = kwargs["position_ids"].expand(query.shape[0], -1)
    if params.get("logn"):
        n = pos.double() + 1
        query = query * torch.clamp(torch.log(n) / math.log(train_len), min=1)[:, None, :, None].float()
    rel = effective_position(name, params, pos[:, :, None], pos[:, None, :])  # (B, T, T)
    angle = rel[..., None] * inv_freq.to(query.device).double()
    cos = torch.cat((angle.cos(), angle.cos()), -1).float()[:, None]  # (B, 1, T, T, rotary_dim)
    sin = torch.cat((angle.sin(), angle.sin()), -1).float()[:, None]
    d = cos.shape[-1]
    q = query[:, :, :, None, :d]  # (B, H, T, 1, d)
    q_rot = q * cos + torch.cat((-q[..., d // 2:], q[..., : d // 2]), -1) * sin
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scores = (q_rot * key[:, :, None, :, :d]).sum(-1) + query[..., d:] @ key[..., d:].transpose(-1, -2)
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + attention_mask
    return (scores.softmax(-1) @ value).transpose(1, 2).contiguous(), None
