"""Attention-scale modifiers of frequency variants, applied at the attention seam after rotation and any norm.

Su's log-n scaling multiplies the query at 1-based position n by max(1, ln n / ln L), keeping attention entropy
roughly constant as the context grows past the training length L; DeepSeek's YaRN multiplies the softmax scale
by mscale² (``deepseek-yarn``). Both keep the model's attention kernels, so they compose with every variant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lctx.patches.arch import logn_scale
from lctx.patches.seams import override_attention, query_positions


def scale_query(query: torch.Tensor, positions: torch.Tensor, train_len: int) -> torch.Tensor:
    """query (batch, heads, q_len, dim) × the log-n factor of each row's position (batch, q_len)."""
    return query * logn_scale(positions, train_len)[:, None, :, None].to(query.dtype)


@contextlib.contextmanager
def scaled_attention(model: nn.Module, logn_train_len: int | None, softmax_factor: float = 1.0) -> Iterator[None]:
    """Scale queries by the log-n factor (when ``logn_train_len``) and the softmax scale by ``softmax_factor``,
    then run the model's own attention function."""

    def hook(module, query, key, value, attention_mask, *, original, **kwargs):
        if logn_train_len is not None:
            query = scale_query(query, query_positions(kwargs, query), logn_train_len)
        if softmax_factor != 1.0:
            scaling = kwargs.get("scaling")
            kwargs["scaling"] = (query.shape[-1] ** -0.5 if scaling is None else scaling) * softmax_factor
        return original(module, query, key, value, attention_mask, **kwargs)

    with override_attention(model, hook):
        yield
