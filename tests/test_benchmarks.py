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


def test_the_scale_block_states_the_target_and_replaces_only_itself(tmp_path) -> None:
    from benchmarks import scale

    times = {"serial": [10.0, 12.0], "serial1": [8.0, 8.0], "cluster": [14.0, 15.0], "own": [20.0, 22.0]}
    text = scale.block("python -m benchmarks.scale", "today", 1.0, times, [5.0, 6.0], True, 18)
    assert "| 14.0, 15.0 | 14.5 | 1.32× |" in text and "Target (cluster up: ≤ 1.3× serial): missed (1.32×; " \
        "1.81× the 1-thread serial run)." in text
    assert "took 5.0, 6.0 s" in text and "identical to the serial run's (status, metrics, samples, data): yes" in text
    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\n\n<!-- begin sweep -->\nS\n<!-- end sweep -->\n")
    scale.write(path, text)
    scale.write(path, text.replace("today", "tomorrow"))
    written = path.read_text()
    assert written.count("<!-- begin scale -->") == 1 and "tomorrow" in written and "today" not in written
    assert written.startswith("# Benchmarks\n\n<!-- begin sweep -->\nS\n<!-- end sweep -->")
