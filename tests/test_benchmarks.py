"""The benchmark's naive baseline computes the same ReRoPE as lctx, and reports replace only their own block."""

from __future__ import annotations

import torch
from tiny import TRAIN_LEN, tiny_model

from benchmarks import naive_rerope, run
from lctx import patches


def test_naive_two_matrix_rerope_matches_lctx() -> None:
    model = tiny_model("llama")
    x = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with patches.apply(model, "rerope:window=16", train_len=TRAIN_LEN):
            expected = model(x).logits
        with naive_rerope.apply(model, window=16):
            got = model(x).logits
        restored = model(x).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert not torch.allclose(restored, expected, atol=1e-4)  # the patch is gone


def test_write_replaces_only_its_block(tmp_path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    run.write(path, {"memory": "<!-- begin memory -->\nM1\n<!-- end memory -->"})
    run.write(path, {"prefill": "<!-- begin prefill -->\nP1\n<!-- end prefill -->"})
    run.write(path, {"memory": "<!-- begin memory -->\nM2\n<!-- end memory -->"})
    text = path.read_text()
    assert text.startswith(run.HEADER.splitlines()[0])
    assert "M1" not in text and text.index("P1") < text.index("M2")  # kept in section order
