"""Tiny random decoders of every supported architecture, for exactness tests (fp32, CPU, milliseconds)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TRAIN_LEN = 64
THETA = 10000.0
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox", "olmo", "olmo2")


def tiny_config(arch: str, rope: dict | None = None, **overrides):
    """A 2-layer config of ``arch`` with GQA where the architecture has it and partial rotary for NeoX."""
    rope_parameters = {"rope_type": "default", "rope_theta": THETA, **(rope or {})}
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=TRAIN_LEN, rope_parameters=rope_parameters,
                  attn_implementation="eager" if arch == "gemma2" else "sdpa", tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    extra = {
        "llama": dict(num_key_value_heads=2),
        "mistral": dict(num_key_value_heads=2, sliding_window=None),
        "qwen2": dict(num_key_value_heads=2),
        "qwen3": dict(num_key_value_heads=2, head_dim=16),
        "gemma": dict(num_key_value_heads=1, head_dim=16),
        "gemma2": dict(num_key_value_heads=2, head_dim=16, sliding_window=24, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, query_pre_attn_scalar=16),
        "phi3": dict(num_key_value_heads=2, original_max_position_embeddings=TRAIN_LEN),
        "gpt_neox": dict(rope_parameters={**rope_parameters, "partial_rotary_factor": 0.25},
                         use_parallel_residual=True),
        "olmo": dict(num_key_value_heads=4),
        "olmo2": dict(num_key_value_heads=2),
    }[arch]
    return AutoConfig.for_model(arch, **{**common, **extra, **overrides})


def tiny_model(arch: str, rope: dict | None = None, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, rope, **overrides)).eval()


def same_weights(model, arch: str, rope: dict, **overrides):
    """A copy of ``model`` whose config carries transformers' own ``rope_parameters``: the reference."""
    other = AutoModelForCausalLM.from_config(tiny_config(arch, rope, **overrides)).eval()
    other.load_state_dict(model.state_dict())
    return other
