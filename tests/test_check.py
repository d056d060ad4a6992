"""Up-front refusal from the config, the ``layers`` modifier, the variants added for other architectures
(longrope, deepseek-yarn, proportional) and the LM head's post-processing, on tiny models of named types."""

from __future__ import annotations

import pytest
import torch

from lctx import matrix, patches
from lctx.patches import UnsupportedModelError
from lctx.patches.arch import logits_processor
from lctx.patches.naive import naive_logits
from lctx.patches.tiny import TRAIN_LEN

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(model_type: str, **rope):
    config = matrix.matrix_config(model_type)
    if rope:
        config = matrix.with_rope(config, lambda entry: {**entry, **rope}, dynamic=False)
    with matrix.quiet():
        return config, matrix.build(config)


# ---- refusal before any weights load ------------------------------------------------------------------------

@pytest.mark.parametrize(("model_type", "spec", "words"), [
    ("gpt2", "yarn:factor=4", "'gpt2' has no rotary position embedding"),
    ("deepseek_v32", "rerope", "computes attention differently under another attention implementation"),
    ("deepseek_v32", "none:logn=true", "computes attention differently"),
    ("phimoe", "yarn:factor=4", "computes cos/sin without reading its inv_freq buffer"),
    ("cohere2", "yarn:factor=4:layers=full", "share one rotary embedding"),
    ("llama", "yarn:factor=4:layers=sliding", "llama has no sliding-attention layers"),
    ("llama", "rerope:layers=sliding", "no sliding-attention layer with RoPE"),
    ("cohere2", "rerope:layers=full", "cohere2: no full-attention layer with RoPE"),  # its global layers are NoPE
    ("llama", "longrope:factor=4", "config has no short_factor/long_factor"),
    ("llama", "longrope:factor=4:short_factor=[1,2]:long_factor=[1,2]", "short_factor has 2 values"),
])
def test_check_refuses_from_the_config(model_type: str, spec: str, words: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)  # the real sizes: only built on the meta device and shrunk
    with pytest.raises(UnsupportedModelError) as err:
        patches.check(config, spec)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("model_type", "spec"), [
    ("deepseek_v32", "yarn:factor=4"), ("cohere2", "rerope:layers=sliding"),
    ("gemma3_text", "yarn:factor=4:layers=full"), ("smollm3", "self-extend"),
    ("deepseek_v3", "deepseek-yarn:factor=40"), ("gpt_oss", "leaky-rerope:layers=sliding"),
])
def test_check_accepts_what_apply_can_do(model_type: str, spec: str) -> None:
    from transformers import AutoConfig

    patches.check(AutoConfig.for_model(model_type), spec)


# ---- layers= on per-layer-type and sliding-window models ------------------------------------------------------

def test_layers_picks_the_rope_of_each_layer_type() -> None:
    """Gemma 3: the default scales the full-attention type only, as transformers' per-type rope_parameters."""
    config, model = tiny("gemma3_text")
    x = matrix.ids(matrix.LONG)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAIN_LEN}
    params = config.rope_parameters
    for layers, types in ((None, {"full_attention"}), ("full", {"full_attention"}), ("sliding", {"sliding_attention"}),
                          ("all", {"full_attention", "sliding_attention"})):
        d = config.to_dict()
        d["rope_parameters"] = {k: {**v, **yarn} if k in types else v for k, v in params.items()}
        d["max_position_embeddings"] = 8 * TRAIN_LEN
        with matrix.quiet():
            reference = matrix.build(type(config).from_dict(d))
        reference.load_state_dict(model.state_dict())
        spec = "yarn:factor=4" + (f":layers={layers}" if layers else "")
        with patches.apply(model, spec, TRAIN_LEN):
            got = matrix.logits(model, x)
        assert matrix.max_error(got, matrix.logits(reference, x)) <= TOL, spec


@pytest.mark.parametrize("layers", ["full", "sliding", "all"])
def test_attention_variants_on_chosen_layers_match_the_reference(layers: str) -> None:
    """gpt-oss: sliding and full layers share one rotary; the layers left alone keep plain RoPE (and sinks)."""
    _, model = tiny("gpt_oss")
    x = matrix.ids(matrix.ATTENTION_LEN)
    before = matrix.logits(model, x)
    resolved = patches.parse(f"rerope:window=16:layers={layers}").resolve(TRAIN_LEN)
    with patches.apply(model, resolved, TRAIN_LEN):
        got = matrix.logits(model, x)
        prompt = matrix.ids(40)
        cached = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        recomputed = prompt
        for _ in range(6):
            recomputed = torch.cat([recomputed, matrix.logits(model, recomputed)[:, -1:].argmax(-1)], dim=1)
    assert matrix.max_error(got, naive_logits(model, x, resolved.name, resolved.kwargs, TRAIN_LEN)) <= TOL
    assert matrix.max_error(got, before) > 1e-3
    assert torch.equal(cached, recomputed)
    assert torch.equal(matrix.logits(model, x), before)


def test_layers_keeps_existing_canonical_specs() -> None:
    resolve = lambda text: patches.parse(text).resolve(TRAIN_LEN).canonical  # noqa: E731
    assert resolve("yarn:factor=4") == \
        "yarn:factor=4:beta_fast=32:beta_slow=1:attention_factor=1.138629436111989:logn=false"
    assert resolve("yarn:factor=4:layers=full") == \
        "yarn:factor=4:beta_fast=32:beta_slow=1:attention_factor=1.138629436111989:layers=full:logn=false"
    assert resolve("rerope:layers=all") == "rerope:window=16:layers=all:logn=false"
    with pytest.raises(patches.SpecError, match="layers=local is not valid: layers .*one of all, full, sliding"):
        patches.parse("rerope:layers=local")


# ---- the variants added for other architectures -----------------------------------------------------------------

def test_longrope_takes_the_checkpoints_factors() -> None:
    """A checkpoint shipping LongRoPE: longrope:factor=4 without factors reproduces it, short and long."""
    short = [1.0 + 0.1 * i for i in range(8)]
    long = [2.0 + 0.5 * i for i in range(8)]
    _, model = tiny("llama", rope_type="longrope", factor=4.0, short_factor=short, long_factor=long,
                    original_max_position_embeddings=TRAIN_LEN)
    for length in (TRAIN_LEN, matrix.LONG):
        x = matrix.ids(length)
        before = matrix.logits(model, x)
        with patches.apply(model, "longrope:factor=4", TRAIN_LEN):
            got = matrix.logits(model, x)
        assert matrix.max_error(got, before) <= TOL, length
        with patches.apply(model, f"longrope:factor=4:short_factor={patches.format_value(long)}:"
                                  f"long_factor={patches.format_value(long)}", TRAIN_LEN):
            assert (length > TRAIN_LEN) == (matrix.max_error(matrix.logits(model, x), before) <= TOL)


def test_deepseek_yarn_on_a_plain_model_puts_the_temperature_on_the_softmax() -> None:
    """On Llama: transformers' YaRN frequencies with mscale/mscale_all_dim, and the softmax scale × mscale_all²."""
    import math

    config, model = tiny("llama")
    rope = {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.8,
            "original_max_position_embeddings": TRAIN_LEN}
    reference_config = matrix.with_rope(config, lambda entry: {**entry, **rope}, dynamic=False)
    with matrix.quiet():
        reference = matrix.build(reference_config)
    reference.load_state_dict(model.state_dict())
    factor = (0.1 * 0.8 * math.log(4.0) + 1.0) ** 2
    for module in patches.arch.attention_modules(reference):
        module.scaling *= factor
    x = matrix.ids(matrix.LONG)
    with patches.apply(model, "deepseek-yarn:factor=4:mscale=1:mscale_all_dim=0.8", TRAIN_LEN):
        got = matrix.logits(model, x)
    assert matrix.max_error(got, matrix.logits(reference, x)) <= TOL


# ---- the LM head ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("model_type", "settings"), [
    ("cohere", {"logit_scale": 0.25}), ("granite", {"logits_scaling": 4.0}),
    ("gemma2", {"final_logit_softcapping": 0.2}), ("falcon_h1", {"lm_head_multiplier": 0.5}),
])
def test_logits_processor_reproduces_the_models_logits(model_type: str, settings: dict) -> None:
    from transformers import AutoConfig

    config = patches.tiny.tiny_config(AutoConfig.for_model(model_type, **settings))
    with matrix.quiet():
        model = matrix.build(config)
    x = matrix.ids(TRAIN_LEN)
    with torch.no_grad():
        hidden = patches.arch.base_model(model)(input_ids=x).last_hidden_state
        raw = model.get_output_embeddings()(hidden)
        processed = logits_processor(model)(raw)
    expected = matrix.logits(model, x)
    assert matrix.max_error(processed, expected) <= TOL
    assert matrix.max_error(raw, expected) > 1e-3  # a real post-processing, reproduced
    assert torch.equal(logits_processor(model)(raw[0]), processed[0])  # (rows, vocab) as the chunked loss has it


def test_logits_processor_refuses_a_head_before_the_output_embedding() -> None:
    _, model = tiny("minicpm3")
    with pytest.raises(UnsupportedModelError, match="transforms the hidden states before the output embedding"):
        logits_processor(model)(torch.zeros(3, model.config.vocab_size))
