"""ReRoPE, Leaky ReRoPE and SelfExtend against a naive reference written from their position formulas."""

from __future__ import annotations

import functools

import pytest
import torch
from references import formula_attention
from tiny import ARCHS, TRAIN_LEN, same_weights, tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from lctx import patches
from lctx.patches import SpecError, rerope

TOL = 1e-5
WINDOW = 16
SPECS = [f"rerope:window={WINDOW}", f"leaky-rerope:window={WINDOW}:k=4", f"self-extend:window={WINDOW}:group=4"]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 7 query rows, so every test crosses chunk boundaries inside and outside the window."""
    monkeypatch.setattr(rerope, "CHUNK_SIZE", 7)


def ids(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kwargs).logits


# ---- the reference: every score rotated by its own effective relative position (tests/references.py) ----


def reference_model(model, arch: str, spec: str, rope: dict | None = None, **overrides):
    """Same weights, rotary made the identity, attention replaced by the reference above.

    Zeroed frequencies leave cos = attention_scaling, sin = 0: q and k arrive scaled as in the model.
    """
    resolved = patches.parse(spec).resolve(TRAIN_LEN)
    reference = same_weights(model, arch, rope or {}, **overrides)
    (rotary,) = [m for m in reference.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    inv_freq = rotary.inv_freq.clone()
    rotary.inv_freq.zero_()
    fn = functools.partial(formula_attention, name=resolved.name, params=resolved.kwargs, inv_freq=inv_freq,
                           train_len=TRAIN_LEN)
    AttentionInterface.register("test_rerope", fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register("test_rerope", eager_mask)
    reference.config._attn_implementation = "test_rerope"
    return reference


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_reference(arch: str) -> None:
    model = tiny_model(arch)
    for spec in SPECS:
        reference = reference_model(model, arch, spec)
        for length in (12, 100):  # inside the window, and far past it (and past Gemma-2's sliding window)
            x = ids(length)
            with patches.apply(model, spec, train_len=TRAIN_LEN):
                got = logits(model, x)
            expected = logits(reference, x)
            assert torch.allclose(got, expected, atol=TOL, rtol=0), (arch, spec, length,
                                                                     (got - expected).abs().max())


@pytest.mark.parametrize("spec", [f"rerope:window={WINDOW}:logn=true", "self-extend:window=5:group=3:logn=true"])
def test_logn_and_odd_sizes_match_reference(spec: str) -> None:
    model = tiny_model("llama")
    reference = reference_model(model, "llama", spec)
    x = ids(150)
    with patches.apply(model, spec, train_len=TRAIN_LEN):
        got = logits(model, x)
    assert torch.allclose(got, logits(reference, x), atol=TOL, rtol=0)


@pytest.mark.parametrize(("arch", "rope", "overrides"), [
    ("mistral", {}, {"sliding_window": 24}),  # SDPA with a sliding-window mask
    ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAIN_LEN},
     {"max_position_embeddings": 4 * TRAIN_LEN}),  # a checkpoint's own frequencies and cos/sin scale
])
def test_model_settings_match_reference(arch: str, rope: dict, overrides: dict) -> None:
    model = tiny_model(arch, rope, **overrides)
    x = ids(100)
    for spec in SPECS:
        reference = reference_model(model, arch, spec, rope, **overrides)
        with patches.apply(model, spec, train_len=TRAIN_LEN):
            got = logits(model, x)
        assert torch.allclose(got, logits(reference, x), atol=TOL, rtol=0), spec


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_settings_and_exact_restore(arch: str) -> None:
    model = tiny_model(arch)
    x = ids(100)
    before = logits(model, x)
    for spec in ("rerope:window=100", "rerope:window=1000", "leaky-rerope:window=8:k=1",
                 "self-extend:window=8:group=1"):
        with patches.apply(model, spec, train_len=TRAIN_LEN):
            got = logits(model, x)
        assert torch.allclose(got, before, atol=TOL, rtol=0), (spec, (got - before).abs().max())
    for spec in SPECS:
        with patches.apply(model, spec, train_len=TRAIN_LEN):
            assert not torch.allclose(logits(model, x), before, atol=1e-4)  # a real change
        assert torch.equal(logits(model, x), before), spec
    assert model.config._attn_implementation == ("eager" if arch == "gemma2" else "sdpa")


def left_padded(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded batch, its attention mask and the position ids generate() would give it."""
    width = max(lengths)
    x = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for row, n in enumerate(lengths):
        x[row, width - n:] = ids(n, seed=row + 2)[0]
        mask[row, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return x, mask, positions


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_neox"])
def test_left_padding_matches_unbatched(arch: str) -> None:
    model = tiny_model(arch)
    lengths = [100, 61, 9]
    x, mask, positions = left_padded(lengths)
    for spec in SPECS:
        with patches.apply(model, spec, train_len=TRAIN_LEN):
            batched = logits(model, x, attention_mask=mask, position_ids=positions)
            for row, n in enumerate(lengths):
                alone = logits(model, x[row:row + 1, -n:])
                got = batched[row:row + 1, -n:]
                assert torch.allclose(got, alone, atol=TOL, rtol=0), (spec, n, (got - alone).abs().max())


def greedy_by_recomputation(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    out = prompt
    for _ in range(new):
        out = torch.cat([out, logits(model, out)[:, -1:].argmax(-1)], dim=1)
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_cached_generation_matches_recomputation(arch: str) -> None:
    model = tiny_model(arch)
    prompt, new = ids(40), 20  # prompt longer than the window: decoding sees near and far keys
    for spec in SPECS:
        with patches.apply(model, spec, train_len=TRAIN_LEN), torch.no_grad():
            cached = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            assert torch.equal(cached, greedy_by_recomputation(model, prompt, new)), (arch, spec)


def test_cached_generation_with_left_padding() -> None:
    model = tiny_model("llama")
    x, mask, _ = left_padded([40, 23])
    new = 12
    for spec in SPECS:
        with patches.apply(model, spec, train_len=TRAIN_LEN), torch.no_grad():
            batched = model.generate(x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, pad_token_id=0)
            for row, n in enumerate([40, 23]):
                alone = greedy_by_recomputation(model, x[row:row + 1, -n:], new)
                assert torch.equal(batched[row:row + 1, -(n + new):], alone), (spec, n)


def test_registered_with_defaults_from_training_length() -> None:
    resolve = lambda text: patches.parse(text).resolve(4096).canonical  # noqa: E731
    assert resolve("rerope") == "rerope:window=1024:logn=false"
    assert resolve("leaky-rerope:window=512") == "leaky-rerope:window=512:k=16:logn=false"
    assert resolve("self-extend:logn=true") == "self-extend:group=8:window=1024:logn=true"
    for name in ("rerope", "leaky-rerope", "self-extend"):
        variant = patches.REGISTRY[name]
        assert variant.kind == "attention" and not variant.length_dependent
        assert variant.description and variant.reference


@pytest.mark.parametrize(("spec", "words"), [
    ("rerope:window=0", ["window=0", "≥ 1"]),
    ("leaky-rerope:k=0.5", ["k=0.5", "≥ 1"]),
    ("self-extend:group=0", ["group=0", "≥ 1"]),
    ("self-extend:window=-3", ["window=-3"]),
    ("rerope:window=2.5", ["window=2.5 is not valid", "int"]),
    ("rerope:chunk=8", ["unknown parameter 'chunk'"]),
])
def test_bad_parameters_are_named(spec: str, words: list[str]) -> None:
    with pytest.raises(SpecError) as error:
        patches.parse(spec).resolve(TRAIN_LEN)
    for word in words:
        assert word in str(error.value)


def test_fully_masked_rows_merge_to_the_other_part() -> None:
    """A part with no open key (mask = dtype min) must get weight 0, in the kernel and in the fallback."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    closed = torch.full((1, 1, 5, 6), torch.finfo(torch.float32).min)
    open_ = torch.zeros(1, 1, 5, 6)
    for softcap in (None, 30.0):
        out, lse = rerope._partial_attention(q, k, v, open_, 0.5, softcap)
        empty_out, empty_lse = rerope._partial_attention(q, k, v, closed, 0.5, softcap)
        assert torch.isfinite(empty_out).all() and torch.isfinite(empty_lse).all()
        assert torch.equal(rerope._merge(out, lse, empty_out, empty_lse)[0], out)
    flash = rerope._partial_attention(q, k, v, open_, 0.5, None)
    plain = rerope._materialized(q, k, v, open_, 0.5, None)
    for a, b in zip(flash, plain, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
