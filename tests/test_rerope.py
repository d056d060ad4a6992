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
    ("leaky-rerope:k=0", ["k=0", "> 0"]),
    ("leaky-rerope:k=-0.5", ["k=-0.5", "> 0"]),
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


# ---- inverse Leaky ReRoPE (k < 1) and training ----------------------------------------------------------------

def test_inverse_leaky_specs_are_accepted() -> None:
    """k < 1 (far positions advance 1/k > 1 per token) is Su's training-time use; k = 1 still reproduces RoPE."""
    assert patches.parse("leaky-rerope:window=32:k=0.0625").resolve(128).canonical == \
        "leaky-rerope:window=32:k=0.0625:logn=false"
    assert "k < 1" in patches.REGISTRY["leaky-rerope"].description


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma2"])
def test_inverse_leaky_matches_reference(arch: str) -> None:
    model = tiny_model(arch)
    spec = f"leaky-rerope:window={WINDOW}:k=0.25"
    reference = reference_model(model, arch, spec)
    x = ids(100)  # the farthest key sits at 16 + 83 · 4 = 348, past anything plain RoPE reaches at 100 tokens
    with patches.apply(model, spec, train_len=TRAIN_LEN):
        got = logits(model, x)
    expected = logits(reference, x)
    assert torch.allclose(got, expected, atol=TOL, rtol=0), (got - expected).abs().max()
    assert not torch.allclose(got, logits(model, x), atol=1e-3)


def loss_and_grads(model, x: torch.Tensor, forward) -> tuple[float, dict[str, torch.Tensor]]:
    """Next-token loss of ``forward(x)`` (logits) and the gradient of every parameter."""
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(forward(x)[0, :-1], x[0, 1:])
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(("arch", "spec"), [
    ("llama", "leaky-rerope:window=8:k=0.25"), ("llama", "rerope:window=8"), ("llama", "self-extend:window=8:group=3"),
    ("llama", "leaky-rerope:window=8:k=4:logn=true"), ("gpt_neox", "leaky-rerope:window=8:k=0.25"),
])
def test_training_loss_and_gradients_match_naive_reference(arch: str, spec: str) -> None:
    """Under autograd the patch is the naive reference's function: equal loss and parameter gradients.

    The fused kernels' log-sum-exp has no gradient, so without the materialised path the gradients of the merge
    would be off by ~1e-3 while the loss stayed equal; chunks of 7 rows cross the window inside each part.
    """
    from lctx.patches.naive import naive_logits

    model = tiny_model(arch)
    x = ids(41)
    resolved = patches.parse(spec).resolve(TRAIN_LEN)
    with patches.apply(model, resolved, TRAIN_LEN):
        loss, grads = loss_and_grads(model, x, lambda x: model(x).logits)
    ref_loss, ref_grads = loss_and_grads(
        model, x, lambda x: naive_logits(model, x, resolved.name, resolved.kwargs, TRAIN_LEN, grad=True))
    _, plain_grads = loss_and_grads(model, x, lambda x: model(x).logits)
    assert abs(loss - ref_loss) <= TOL
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], atol=TOL, rtol=0), (name, (grad - ref_grads[name]).abs().max())
    assert max((grads[n] - plain_grads[n]).abs().max() for n in grads) > 20 * TOL  # the variant changed them


def test_rotation_under_autograd_equals_the_in_place_one() -> None:
    """Layout.rotate's autograd form (no ``out=``) against its in-place form, for every layout kind."""
    from lctx.patches.layout import Layout

    x = torch.randn(2, 3, 5, 24, dtype=torch.float64)
    angle = torch.randn(5, 8, dtype=torch.float64)
    for offset in (0, 8):
        for interleaved in (False, True):
            for direction in (1, -1):
                layout = Layout(None, offset, 8, interleaved, 24, direction)
                with torch.no_grad():
                    expected = layout.rotate(x, angle.cos(), angle.sin())
                leaf = x.clone().requires_grad_()
                got = layout.rotate(leaf, angle.cos(), angle.sin())
                assert got.requires_grad and torch.allclose(got, expected, atol=1e-12, rtol=0)
                assert torch.autograd.gradcheck(lambda t, layout=layout: layout.rotate(t, angle.cos(), angle.sin()),
                                                (leaf,))
