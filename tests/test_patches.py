"""Frequency variants against transformers' own RoPE implementations, on every supported architecture."""

from __future__ import annotations

import math

import pytest
import torch
from references import frequency_references
from tiny import ARCHS, THETA, TRAIN_LEN, same_weights, tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from lctx import patches
from lctx.patches.arch import UnsupportedModelError, rope_info

LONG = 4 * TRAIN_LEN + 7  # well past the training length
TOL = 1e-5


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def ids(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def rotary_dim(arch: str) -> int:
    return rope_info(tiny_model(arch)).rotary_dim


def references(arch: str) -> list[tuple[str, dict]]:
    return frequency_references(rotary_dim(arch), THETA, TRAIN_LEN)


def phi3_reference(model, rope: dict, length: int):
    """Phi-3 with the (inv_freq, scaling) transformers computes for ``rope`` on an equivalent Llama config."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=model.config.hidden_size, num_attention_heads=4,
                         max_position_embeddings=TRAIN_LEN if rope["rope_type"] == "dynamic" else 8 * TRAIN_LEN,
                         rope_parameters={"rope_theta": THETA, **rope})
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, seq_len=length)
    reference = same_weights(model, "phi3", {})
    reference.model.rotary_emb.inv_freq.copy_(inv_freq)
    reference.model.rotary_emb.attention_scaling = scaling
    return reference


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_transformers_rope_parameters(arch: str) -> None:
    model = tiny_model(arch)
    x = ids(LONG)
    for spec, rope in references(arch):
        # transformers' dynamic type reads L from max_position_embeddings; the others want it above the original
        longer = {} if rope.get("rope_type") == "dynamic" else {"max_position_embeddings": 8 * TRAIN_LEN}
        if arch == "phi3" and "rope_type" in rope:  # Phi-3's config accepts only longrope: take the frequencies
            reference = phi3_reference(model, rope, LONG)  # from transformers' function for that type
        else:
            reference = same_weights(model, arch, rope, **longer)
        with patches.apply(model, spec, train_len=TRAIN_LEN):
            got = logits(model, x)
        expected = logits(reference, x)
        assert torch.allclose(got, expected, atol=TOL, rtol=0), (arch, spec, (got - expected).abs().max())


IDENTITY = ["none", "pi:factor=1", "ntk:alpha=1", "ntk-mixed:factor=1", "ntk-by-parts:factor=1",
            "yarn:factor=1", "llama3:factor=1", f"base:theta={THETA}", "none:logn=true"]


@pytest.mark.parametrize("arch", ARCHS)
def test_factor_one_is_identity_and_exit_restores(arch: str) -> None:
    model = tiny_model(arch)
    long, short = ids(LONG), ids(TRAIN_LEN)
    before_long, before_short = logits(model, long), logits(model, short)
    for spec in IDENTITY:
        with patches.apply(model, spec):
            assert torch.equal(logits(model, long if "logn" not in spec else short),
                               before_long if "logn" not in spec else before_short), spec
    # dynamic variants scale only past L; below it they are the model itself
    for spec in ("dynamic-ntk:factor=4", "dynamic-yarn"):
        with patches.apply(model, spec):
            assert torch.equal(logits(model, short), before_short), spec
    # a real change, then exact restore
    for spec in ("yarn:factor=4:logn=true", "dynamic-ntk:factor=4", "ntk-mixed:factor=8"):
        with patches.apply(model, spec):
            assert not torch.allclose(logits(model, long), before_long)
        assert torch.equal(logits(model, long), before_long), spec


def test_restores_after_exception() -> None:
    model = tiny_model("llama")
    x = ids(LONG)
    before = logits(model, x)
    with pytest.raises(RuntimeError, match="boom"), patches.apply(model, "yarn:factor=4:logn=true"):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, x), before)
    assert model.config._attn_implementation == "sdpa"


def test_ntk_mixed_matches_independent_formula() -> None:
    model = tiny_model("llama")
    factor, beta = 8.0, 0.75
    d = rope_info(model).rotary_dim
    a = math.log(factor) / (d / 2) ** beta
    freqs = [THETA ** (-2 * i / d) * math.exp(-a * (i + 1) ** beta) for i in range(d // 2)]
    assert freqs[-1] == pytest.approx(THETA ** (-(d - 2) / d) / factor)  # lowest frequency: interpolated by s
    reference = same_weights(model, "llama", {})
    reference.model.rotary_emb.inv_freq.copy_(torch.tensor(freqs, dtype=torch.float32))
    x = ids(LONG)
    with patches.apply(model, f"ntk-mixed:factor={factor}:beta={beta}"):
        got = logits(model, x)
    assert torch.allclose(got, logits(reference, x), atol=TOL, rtol=0)


def _logn_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Straightforward eager attention with Su's log-n query scaling, written from the formula."""
    n = kwargs["position_ids"][0].double() + 1
    factor = torch.tensor([max(1.0, math.log(v) / math.log(TRAIN_LEN)) for v in n.tolist()])
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scores = (query * factor[None, None, :, None].float()) @ key.transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    return (scores.softmax(-1) @ value).transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
def test_logn_matches_independent_reference(arch: str) -> None:
    AttentionInterface.register("test_logn", _logn_eager)
    ALL_MASK_ATTENTION_FUNCTIONS.register("test_logn", eager_mask)
    model = tiny_model(arch)
    reference = same_weights(model, arch, {})
    reference.config._attn_implementation = "test_logn"
    x = ids(LONG)
    with patches.apply(model, "none:logn=true"):
        got = logits(model, x)
    assert torch.allclose(got, logits(reference, x), atol=TOL, rtol=0)
    assert not torch.allclose(got, logits(model, x), atol=1e-3)


def test_dynamic_variant_consistent_under_kv_cache() -> None:
    """Cached greedy decoding equals full recomputation with the base the cache was built with."""
    model = tiny_model("llama")
    prompt = ids(3 * TRAIN_LEN)
    new = 12

    def recompute(frozen: int) -> torch.Tensor:
        out = prompt
        with patches.apply(model, "dynamic-ntk:factor=4", seq_len=frozen):
            for _ in range(new):
                out = torch.cat([out, logits(model, out)[:, -1:].argmax(-1)], dim=1)
        return out

    with torch.no_grad():
        with patches.apply(model, "dynamic-ntk:factor=4"):  # base fixed at the prompt's length
            cached = model.generate(prompt, max_new_tokens=new, do_sample=False, min_new_tokens=new)
        assert torch.equal(cached, recompute(prompt.shape[1]))
        total = prompt.shape[1] + new
        with patches.apply(model, "dynamic-ntk:factor=4", seq_len=total):  # base fixed at the final length
            frozen = model.generate(prompt, max_new_tokens=new, do_sample=False, min_new_tokens=new)
        assert torch.equal(frozen, recompute(total))


def test_dynamic_recomputes_per_forward_length() -> None:
    model = tiny_model("llama")
    x = ids(LONG)
    with patches.apply(model, "dynamic-ntk:factor=2"):
        short_in_long = logits(model, x)[:, : 2 * TRAIN_LEN]
        short = logits(model, x[:, : 2 * TRAIN_LEN])
    assert not torch.allclose(short_in_long, short, atol=1e-4)  # different ℓ, different base
    with patches.apply(model, "dynamic-ntk:factor=2", seq_len=LONG):
        assert torch.allclose(logits(model, x[:, : 2 * TRAIN_LEN]), short_in_long, atol=TOL)


# ---- spec grammar -----------------------------------------------------------------------------------------

def test_canonical_fills_defaults_in_fixed_order() -> None:
    resolve = lambda text, **kw: patches.parse(text).resolve(TRAIN_LEN, **kw).canonical  # noqa: E731
    assert resolve("yarn:beta_fast=32:factor=4") == \
        "yarn:factor=4:beta_fast=32:beta_slow=1:attention_factor=1.138629436111989:logn=false"
    assert resolve("ntk:factor=4") == resolve("ntk:alpha=4") == "ntk:alpha=4:logn=false"
    assert resolve("linear:factor=2") == "pi:factor=2:logn=false"
    assert resolve("pi", target_len=4 * TRAIN_LEN) == "pi:factor=4:logn=false"
    assert resolve("none:logn=yes") == "none:logn=true"
    specs = patches.parse_list(["none,ntk:factor=4", "yarn:factor=4", "none"])
    assert [s.name for s in specs] == ["none", "ntk", "yarn"]


@pytest.mark.parametrize("text, message", [
    ("rope9", "unknown RoPE variant 'rope9'. Valid variants: base, deepseek-yarn, dynamic-ntk"),
    ("yarn:factr=4", "yarn: unknown parameter 'factr'. Parameters: factor (float ≥ 1, required), beta_fast"),
    ("yarn:factor=four", "yarn: factor=four is not valid: factor (float ≥ 1, required)"),
    ("yarn:factor", "'factor' is not key=value. Grammar: name[:key=value]*"),
    ("yarn:factor=2:factor=3", "parameter 'factor' given twice"),
    ("none:logn=maybe", "none: logn=maybe is not valid: logn (bool, default false)"),
    ("", "empty RoPE spec"),
])
def test_parse_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(patches.SpecError) as err:
        patches.parse(text)
    assert message in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("pi", "pi: missing required parameter 'factor' (or pass --target-len"),
    ("base", "base: missing required parameter 'theta'"),
    ("ntk", "ntk: give alpha=… or factor=…"),
    ("pi:factor=0.5", "pi: factor=0.5 is not valid: factor (float ≥ 1, required)"),
    ("yarn:factor=4:beta_fast=0", "beta_fast=0 is not valid: beta_fast (float > 0"),
    ("yarn:factor=4:beta_fast=2:beta_slow=4", "beta_fast=2 must be greater than beta_slow=4"),
    ("yarn:factor=4:attention_factor=0", "attention_factor=0 is not valid"),
    ("llama3:low_freq_factor=0", "low_freq_factor=0 is not valid: low_freq_factor (float > 0"),
    ("llama3:low_freq_factor=4:high_freq_factor=2", "high_freq_factor=2 must be greater than low_freq_factor=4"),
    ("ntk-mixed:factor=2:beta=-1", "beta=-1 is not valid"),
    ("base:theta=0", "theta=0 is not valid: theta (float > 1, required)"),
    ("base:theta=-10", "theta=-10 is not valid"),
])
def test_resolve_errors(text: str, message: str) -> None:
    with pytest.raises(patches.SpecError, match=None) as err:
        patches.parse(text).resolve(TRAIN_LEN)
    assert message in str(err.value)


def test_unsupported_models_are_named() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="'gpt2' has no rotary position embedding.*learned absolute"):
        with patches.apply(gpt2, "pi:factor=2"):
            pass
