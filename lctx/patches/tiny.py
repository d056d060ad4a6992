"""A tiny copy of any decoder config: same architecture and RoPE layout, a few thousand parameters.

Used to check a variant against a model before its weights load (:func:`lctx.patches.check` probes the tiny
copy's attention layout) and to build the architecture matrix (``lctx archs``). Sizes shrink by name (hidden
size, heads, experts, MLA ranks, …), every per-layer list keeps one layer of each kind (layer type, NoPE, MoE or
dense, …), token ids move into the small vocabulary; the rest of the config (RoPE parameters, partial rotary,
interleaving, soft-caps, sliding windows) is kept.
"""

from __future__ import annotations

from typing import Any

TRAIN_LEN = 64  # max_position_embeddings of tiny models: long tests run past it in few tokens
VOCAB = 128
MAX_LAYERS = 6

# Sizes by config key. Heads × head_dim = hidden size; MLA's decoupled RoPE part is 8 wide.
SIZES: dict[str, int] = {
    "vocab_size": VOCAB, "hidden_size": 64, "d_model": 64, "n_embd": 64, "lru_width": 64,
    "intermediate_size": 96, "ffn_dim": 96, "ffn_hidden_size": 96, "intermediate_size_mlp": 96, "n_inner": 96,
    "moe_intermediate_size": 32, "expert_ffn_hidden_size": 32, "shared_expert_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "expert_intermediate_size": 32, "dense_intermediate_size": 96,
    "num_attention_heads": 4, "n_head": 4, "head_dim": 16, "global_head_dim": 32, "attention_head_dim": 16,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "qk_head_dim": 24, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "n_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "top_k_experts": 2, "moe_k": 2,
    "n_group": 1, "topk_group": 1,
    "n_shared_experts": 1, "num_shared_experts": 1, "zero_expert_num": 2, "first_k_dense_replace": 1,
    "num_dense_layers": 1,
    "max_position_embeddings": TRAIN_LEN, "original_max_position_embeddings": TRAIN_LEN,
    "sliding_window": 24, "attention_window_size": 24, "attention_chunk_size": 24, "local_attention_window_len": 24,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": VOCAB,
    "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_ssm": 64, "ssm_state_size": 8,
    "mamba_n_groups": 1, "mamba_expand": 1, "state_size": 8, "time_step_rank": 8, "rotary_dim": 8,
    "num_kv_shared_layers": 0, "linear_head_dim": 16, "linear_num_heads": 4, "mamba_headdim": 16,
    "n_mamba_heads": 4, "mamba_num_heads": 4, "mamba_head_dim": 16, "indexer_n_heads": 2, "indexer_kv_heads": 1,
    "indexer_head_dim": 16, "num_expert_group": 1, "n_groups": 1, "moe_shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32, "laurel_rank": 8, "n_heads": 4, "max_seq_len": TRAIN_LEN,
    "model_max_length": TRAIN_LEN,
}
# Experts per token: a model may allow only 1 (ZAYA), so these shrink to at most the sizes above.
AT_MOST = ("num_experts_per_tok", "moe_topk", "top_k_experts", "moe_k", "num_experts_per_token")
FILL_NONE = ("head_dim",)  # None means "hidden size / heads" for these: give the value
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_head_kv")
LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _kv_heads(original: int, original_heads: int) -> int:
    """Keep the attention kind: MHA stays MHA, MQA stays MQA, GQA becomes 2 groups."""
    return SIZES["num_attention_heads"] if original == original_heads else 1 if original == 1 else 2


def _is_index_list(values: list, n: int) -> bool:
    return (all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            and all(0 <= v < n for v in values) and all(a < b for a, b in zip(values, values[1:], strict=False)))


def _cut_layers(d: dict[str, Any]) -> None:
    """Keep one layer per distinct combination of per-layer settings (at least 2, at most MAX_LAYERS)."""
    key = next((k for k in LAYER_COUNTS if isinstance(d.get(k), int)), None)
    if key is None:
        return
    n = d[key]
    lists = {k: v for k, v in d.items() if isinstance(v, list) and len(v) == n and k != "architectures"
             and not _is_index_list(v, n)}
    indices = {k: v for k, v in d.items() if isinstance(v, list) and k != "architectures" and v
               and k not in lists and _is_index_list(v, n)}
    by_layer = {k: v for k, v in d.items() if isinstance(v, dict) and v and all(str(i).isdigit() for i in v)}
    chosen, seen = [], set()
    for i in range(n):
        signature = (tuple(repr(v[i]) for v in lists.values()), tuple(i in v for v in indices.values()),
                     tuple(repr(v.get(i, v.get(str(i)))) for v in by_layer.values()))
        if signature not in seen:
            seen.add(signature)
            chosen.append(i)
    chosen = chosen[:MAX_LAYERS]
    for i in range(n):
        if len(chosen) >= 2:
            break
        if i not in chosen:
            chosen.append(i)
    chosen.sort()
    d[key] = len(chosen)
    for k, v in lists.items():
        d[k] = [v[i] for i in chosen]
    for k, v in indices.items():
        d[k] = [new for new, old in enumerate(chosen) if old in v]
    for k, v in by_layer.items():
        width = max(len(str(i)) for i in v)
        entries = {new: next((v[i] for i in v if int(i) == old), None) for new, old in enumerate(chosen)}
        d[k] = {(str(new).zfill(width) if isinstance(next(iter(v)), str) else new): entry
                for new, entry in entries.items() if entry is not None}


def _shrink_dict(d: dict[str, Any]) -> None:
    original_heads = d.get("num_attention_heads") or d.get("n_head")
    mla = isinstance(d.get("qk_rope_head_dim"), int)
    mla_head = mla and d.get("head_dim") == d.get("qk_rope_head_dim")
    mla_full_head = mla and d.get("head_dim") == (d.get("qk_nope_head_dim") or 0) + d["qk_rope_head_dim"]
    for k, v in list(d.items()):
        if isinstance(v, dict):
            if k == "rope_parameters" or k == "rope_scaling":
                _shrink_rope(v)
            elif "config" in k:
                _shrink_dict(v)
                for entry in v.values():  # per-layer overrides (Gemma 4's per_layer_config)
                    if isinstance(entry, dict):
                        _shrink_dict(entry)
        elif k in AT_MOST and isinstance(v, int):
            d[k] = min(v, SIZES[k])
        elif k in SIZES and isinstance(v, int) and not isinstance(v, bool) or k in FILL_NONE and v is None:
            d[k] = SIZES[k]
        elif k in SIZES and isinstance(v, list) and v and all(isinstance(x, int) for x in v):
            d[k] = [SIZES[k]] * len(v)  # one size per layer (Gemma 3n's intermediate sizes)
        elif k in KV_HEADS and original_heads:
            d[k] = _kv_heads(v if isinstance(v, int) else original_heads, original_heads)
        elif k in TOKEN_IDS and v is not None:
            d[k] = [TOKEN_IDS[k]] if isinstance(v, list) else TOKEN_IDS[k]
        elif isinstance(k, str) and k.endswith("_token_id") and isinstance(v, int) and v >= VOCAB:
            d[k] = VOCAB - 1 - (hash(k) % 8)
    experts = any(isinstance(d.get(k), int) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    for k in ("num_experts_per_tok", "n_routed_experts", "n_shared_experts"):
        if experts and k in d and d[k] is None:
            d[k] = SIZES[k]
    if mla_head:
        d["head_dim"] = d["qk_rope_head_dim"]
    if mla_full_head:
        d["head_dim"] = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
    if mla and "qk_head_dim" in d:
        d["qk_head_dim"] = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
    rope = d.get("rope_parameters") or {}
    partials = [e.get("partial_rotary_factor") for e in (*rope.values(), rope) if isinstance(e, dict)]
    partial = next((p for p in (*partials, d.get("partial_rotary_factor")) if isinstance(p, float)), None)
    if partial is not None and isinstance(d.get("head_dim"), int) and not mla:
        # an odd rotary dimension (16 × 0.334 = 5) is an artefact of shrinking: widen the head until it is even
        d["head_dim"] = next(h for h in (16, 24, 32, 48, 64, 96, 128) if int(h * partial) % 2 == 0 and h * partial >= 2)
    _cut_layers(d)


def _shrink_rope(params: dict[str, Any]) -> None:
    for k, v in list(params.items()):
        if isinstance(v, dict):
            _shrink_rope(v)
        elif k == "original_max_position_embeddings" and v:
            params[k] = TRAIN_LEN


def tiny_config(config: Any) -> Any:
    """A small copy of ``config`` (a transformers config): same class, same RoPE layout, tiny sizes."""
    d = config.to_dict()
    _shrink_dict(d)
    tiny = type(config).from_dict(d)
    tiny._attn_implementation_internal = getattr(config, "_attn_implementation_internal", None)
    return tiny
