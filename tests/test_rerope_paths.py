"""The mask-free CPU path of the ReRoPE family (causal-flag triangles) against its masked path, any geometry.

tests/test_rerope.py checks the masked path and the whole model against a reference written from the formulas;
here random chunk sizes, windows, cache offsets and sliding windows check that both paths agree.
"""

from __future__ import annotations

import random

import pytest
import torch

from lctx.patches import rerope
from lctx.patches.arch import RopeInfo, default_inv_freq

FARS = {
    "rerope": (rerope._rerope_far, {}),
    "leaky-rerope": (rerope._leaky_far, {"k": 3.0}),
    "self-extend": (rerope._self_extend_far, {"group": 3}),
}
INFO = RopeInfo(arch="llama", theta=10000.0, rotary_dim=16, head_dim=16, train_len=64,
                inv_freq=default_inv_freq(10000.0, 16), attention_scaling=1.0)


def causal_mask(offset: int, q_len: int, sliding_window: int | None) -> torch.Tensor:
    """The additive mask the model would pass: open where 0 ≤ i − j (< sliding window)."""
    i = torch.arange(offset, offset + q_len)[:, None]
    j = torch.arange(offset + q_len)[None]
    closed = (j > i) | ((i - j) >= sliding_window if sliding_window else torch.zeros((), dtype=torch.bool))
    return torch.zeros(1, 1, q_len, offset + q_len).masked_fill(closed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("name", sorted(FARS))
def test_mask_free_path_matches_masked_path(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    far, extra = FARS[name]
    rng = random.Random(name)
    used = []
    original = rerope._causal_band
    monkeypatch.setattr(rerope, "_causal_band", lambda *a, **k: used.append(1) or original(*a, **k))
    for _ in range(40):
        q_len, offset = rng.randint(1, 50), rng.choice([0, rng.randint(1, 40)])
        window, sliding = rng.randint(1, 30), rng.choice([None, rng.randint(2, 60)])
        monkeypatch.setattr(rerope, "CHUNK_SIZE", rng.randint(1, 20))
        params = {"window": window, "logn": False, **extra}
        q = torch.randn(1, 4, q_len, 16)
        k, v = torch.randn(1, 2, offset + q_len, 16), torch.randn(1, 2, offset + q_len, 16)
        kwargs = dict(params=params, position_ids=torch.arange(offset, offset + q_len)[None],
                      sliding_window=sliding)
        fast, _ = rerope.windowed_attention(None, q, k, v, None, rotate=rerope._Rotation(INFO, far, params),
                                            **kwargs)
        masked, _ = rerope.windowed_attention(None, q, k, v, causal_mask(offset, q_len, sliding),
                                              rotate=rerope._Rotation(INFO, far, params), **kwargs)
        assert torch.allclose(fast, masked, atol=1e-5, rtol=0), (q_len, offset, window, sliding)
    assert used  # the mask-free path ran


def test_pieces_cover_the_band_exactly() -> None:
    """Every (row, key) pair of a band is covered once by the pieces, and nothing outside it."""
    for rows, keys, band in [((10, 17), (3, 17), (0, 8)), ((40, 47), (0, 33), (8, 1000)),
                             ((40, 47), (20, 33), (8, 28)), ((3, 4), (0, 4), (0, 5))]:
        pieces = rerope._causal_pieces(rows, keys, band)
        count = torch.zeros(rows[1] - rows[0], keys[1] - keys[0], dtype=torch.long)
        for (r0, r1), (k0, k1), kind in pieces:
            t = torch.arange(r1 - r0)[:, None]
            s = torch.arange(k1 - k0)[None]
            seen = {"dense": torch.ones_like(t + s, dtype=torch.bool), "causal": s <= t,
                    "reversed": (k1 - k0 - 1 - s) <= (r1 - r0 - 1 - t)}[kind]
            count[r0 - rows[0]:r1 - rows[0], k0 - keys[0]:k1 - keys[0]] += seen
        i = torch.arange(*rows)[:, None]
        j = torch.arange(*keys)[None]
        assert torch.equal(count, ((i - j >= band[0]) & (i - j < band[1])).long()), (rows, keys, band)
    assert rerope._causal_pieces((0, 8), (0, 8), (0, 8)) is None  # a chunk as wide as the band needs masks
