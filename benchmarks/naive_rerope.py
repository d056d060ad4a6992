"""The comparison baseline for ReRoPE: Su's original formulation, with two full score matrices per layer.

As in the reference implementation published with the method (kexue.fm/archives/9708, github.com/bojone/rerope):
scores with RoPE at the true positions, scores with the query at the window and the key unrotated, both
materialized as (batch, heads, queries, keys) and merged with ``where(distance < window, …)`` before one
softmax. Memory is quadratic in length; it exists only so ``python -m benchmarks.run`` can measure what
lctx's chunked, log-sum-exp-merged version saves. It needs no KV cache and is not registered as a variant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lctx.patches.arch import rope_info, rotary_modules
from lctx.patches.seams import override_attention, query_positions


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """apply_rotary_pos_emb of x (B, H, T, D) at positions (B, T), rotate_half layout."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), -1)[:, None].to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = rot * emb.cos() + torch.cat((-rot[..., half:], rot[..., :half]), -1) * emb.sin()
    return torch.cat((rotated, rest), -1)


@contextlib.contextmanager
def _identity_rotary(model: nn.Module) -> Iterator[None]:
    """The rotary module returns cos = 1, sin = 0: q and k reach attention unrotated."""
    (rotary,) = rotary_modules(model)
    saved = rotary.__dict__.get("forward")
    original = rotary.forward

    def forward(x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        cos, sin = original(x, position_ids, *args, **kwargs)
        return torch.ones_like(cos), torch.zeros_like(sin)

    rotary.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del rotary.forward
        else:
            rotary.forward = saved


@contextlib.contextmanager
def apply(model: nn.Module, window: int) -> Iterator[None]:
    """Patch ``model`` with two-matrix ReRoPE (relative position min(r, window)) for a no-cache forward."""
    info = rope_info(model)
    if info.attention_scaling != 1.0:
        raise ValueError("the naive baseline supports models without a cos/sin scale only")

    def hook(module, query, key, value, attention_mask, *, original, scaling=None, **kwargs):
        if key.shape[2] != query.shape[2]:
            raise ValueError("the naive baseline runs full forwards only (no KV cache)")
        inv_freq = info.inv_freq.to(query.device)
        positions = query_positions(kwargs, query)  # (B, T)
        q_near = _rotate(query, positions, inv_freq, info.rotary_dim)
        k_near = _rotate(key, positions, inv_freq, info.rotary_dim)
        q_far = _rotate(query, torch.full_like(positions, window), inv_freq, info.rotary_dim)
        groups = query.shape[1] // key.shape[1]
        k_near, key, value = (t.repeat_interleave(groups, dim=1) for t in (k_near, key, value))
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        near = (q_near @ k_near.transpose(-1, -2)) * scale  # (B, H, T, T): the first full matrix
        far = (q_far @ key.transpose(-1, -2)) * scale  # the second
        distance = positions[:, None, :, None] - positions[:, None, None, :]
        scores = torch.where(distance < window, near, far)
        if attention_mask is None:
            scores = scores.masked_fill(distance < 0, torch.finfo(scores.dtype).min)
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
        weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
        return (weights @ value).transpose(1, 2).contiguous(), None

    with _identity_rotary(model), override_attention(model, hook):
        yield
