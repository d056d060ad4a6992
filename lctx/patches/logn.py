"""Su's log-n attention scaling: the query at 1-based position n is multiplied by max(1, ln n / ln L).

Keeps attention entropy roughly constant as the context grows past the training length L. Applied at the
attention seam, after rotation and any query norm, so it composes with every variant and kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lctx.patches.arch import logn_scale, override_attention, query_positions


def scale_query(query: torch.Tensor, positions: torch.Tensor, train_len: int) -> torch.Tensor:
    """query (batch, heads, q_len, dim) × the log-n factor of each row's position (batch, q_len)."""
    return query * logn_scale(positions, train_len)[:, None, :, None].to(query.dtype)


@contextlib.contextmanager
def logn_attention(model: nn.Module, train_len: int) -> Iterator[None]:
    """Scale queries by the log-n factor, then run the model's own attention function unchanged."""

    def hook(module, query, key, value, attention_mask, *, original, **kwargs):
        query = scale_query(query, query_positions(kwargs, query), train_len)
        return original(module, query, key, value, attention_mask, **kwargs)

    with override_attention(model, hook):
        yield
