"""Where a transformers 5.x decoder keeps its RoPE: found by structure, not from a list of architectures.

A *rotary* is one set of frequencies the model turns position ids into cos/sin with: a module holding an
``inv_freq`` buffer (Llama, Mixtral, DeepSeek, GLM, Phi, …), or one layer type's ``{type}_inv_freq`` buffers in a
module that serves several (Gemma 3, ModernBERT-decoder, OLMo 3: per-layer-type RoPE). Frequency variants rewrite
those buffers in place (see :mod:`lctx.patches.seams`). Attention modules are the modules whose forward calls
``ALL_ATTENTION_FUNCTIONS``; attention-level variants install an attention function there and learn how each
module rotates its queries and keys by probing it (:mod:`lctx.patches.layout`).

:func:`check` refuses a variant from the config alone, before any weights load; :func:`logits_processor`
reproduces what a model's forward does to its LM head's output (Cohere's logit scale, Gemma's soft-cap, …).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LOCAL_LAYER_TYPES = ("sliding", "chunked", "local")  # layer types whose attention sees a bounded window
LAYERS = ("all", "full", "sliding")


class UnsupportedModelError(ValueError):
    """The model has no rotary embedding lctx can patch, or a layout lctx cannot patch exactly (one-line reason)."""


@dataclass(frozen=True)
class RopeInfo:
    """What every variant reads from one rotary: base, rotary dimension, training length, original freqs.

    ``layer_type`` names the layer type whose buffers these are (per-layer-type RoPE), None for a plain rotary.
    ``inv_freq`` may end in zeros (Gemma 4's proportional RoPE): those dimensions stay position-free.
    """

    arch: str
    theta: float
    rotary_dim: int
    head_dim: int
    train_len: int
    inv_freq: torch.Tensor  # the model's own (float32, rotary_dim // 2), as loaded
    attention_scaling: float
    layer_type: str | None = None


@dataclass(frozen=True)
class Rotary:
    """One set of frequencies in a rotary module: its plain buffers (``layer_type`` None) or one layer type's."""

    module: nn.Module
    layer_type: str | None = None

    @property
    def prefix(self) -> str:
        return "" if self.layer_type is None else f"{self.layer_type}_"

    @property
    def inv_freq(self) -> torch.Tensor:
        return getattr(self.module, self.prefix + "inv_freq")

    @property
    def original_inv_freq(self) -> torch.Tensor:
        return getattr(self.module, self.prefix + "original_inv_freq", self.inv_freq)

    @property
    def attention_scaling(self) -> float:
        return float(getattr(self.module, self.prefix + "attention_scaling", 1.0) or 1.0)

    def set_attention_scaling(self, value: float) -> None:
        setattr(self.module, self.prefix + "attention_scaling", value)

    @property
    def local(self) -> bool | None:
        """Whether this rotary serves sliding-window layers only (None: a plain rotary, it may serve both)."""
        return None if self.layer_type is None else is_local(self.layer_type)


def is_local(layer_type: str | None) -> bool:
    return layer_type is not None and any(word in layer_type for word in LOCAL_LAYER_TYPES)


def text_config(model_or_config: Any):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder(model: nn.Module) -> nn.Module:
    """The text decoder (a multimodal model's language model), whose RoPE lctx patches: ``get_decoder()`` if it
    holds the input embeddings (ModernBERT-decoder's is its output head), else the child that does (Llama 4)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None

    def holds_embeddings(module: nn.Module) -> bool:
        return embeddings is None or any(m is embeddings for m in module.modules())

    get = getattr(model, "get_decoder", None)
    try:
        found = get() if callable(get) else None
    except (AttributeError, NotImplementedError, ValueError):
        found = None
    if isinstance(found, nn.Module) and found is not model and holds_embeddings(found):
        return found
    return next((child for child in model.children() if embeddings is not None and holds_embeddings(child)), model)


def base_model(model: nn.Module) -> nn.Module:
    """The model under the LM head, whose ``last_hidden_state`` the head reads (``model.base_model``, unless
    that is the causal LM itself, as for Llama 4's text model)."""
    return model.base_model if model.base_model is not model else decoder(model)


def rotaries(model: nn.Module) -> list[Rotary]:
    """Every set of frequencies in the decoder: plain ``inv_freq`` buffers and per-layer-type ``{type}_inv_freq``."""
    found = []
    for module in decoder(model).modules():
        names = [name for name, buffer in module.named_buffers(recurse=False) if isinstance(buffer, torch.Tensor)]
        if "inv_freq" in names:
            found.append(Rotary(module))
        found += [Rotary(module, name[: -len("_inv_freq")]) for name in names
                  if name.endswith("_inv_freq") and not name.endswith("original_inv_freq")
                  and f"{name[: -len('inv_freq')]}original_inv_freq" in names]
    return found


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that turn position ids into RoPE cos/sin (each listed once)."""
    return list({id(r.module): r.module for r in rotaries(model)}.values())


@functools.cache
def _calls_attention_interface(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


@functools.cache
def branches_on_implementation(cls: type) -> bool:
    """Whether the module's forward does something else under another attention implementation's name
    (DeepSeek Sparse Attention builds its indexer's mask only for "eager" and "sdpa")."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return any("_attn_implementation" in line and any(op in line for op in ("==", "!=", " in (", " in ["))
               for line in source.splitlines())


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder's attention modules: those whose forward calls ``ALL_ATTENTION_FUNCTIONS`` (the seam)."""
    return [m for m in decoder(model).modules() if _calls_attention_interface(type(m))]


def layer_kind(model: nn.Module, module: nn.Module) -> str:
    """"sliding" for an attention module with a bounded window (sliding or chunked), "full" otherwise."""
    types = getattr(text_config(model), "layer_types", None)
    index = getattr(module, "layer_idx", None)
    if types and index is not None and index < len(types):
        return "sliding" if is_local(types[index]) else "full"
    return "sliding" if getattr(module, "sliding_window", None) else "full"


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The config's RoPE parameters for ``layer_type`` (per-layer-type dicts), or its only ones."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        return params[layer_type]
    if params and all(isinstance(v, dict) or v is None for v in params.values()):  # per type, none asked
        return next((v for k, v in params.items() if isinstance(v, dict) and not is_local(k)), None) or \
            next((v for v in params.values() if isinstance(v, dict)), {})
    return params


def training_length(config) -> int:
    """``original_max_position_embeddings`` when the config has it, else ``max_position_embeddings``."""
    config = text_config(config)
    for value in (rope_parameters(config).get("original_max_position_embeddings"),
                  getattr(config, "original_max_position_embeddings", None),
                  getattr(config, "max_position_embeddings", None)):
        if value:
            return int(value)
    raise UnsupportedModelError(
        f"cannot tell the training length of {config.model_type!r}: the config has no max_position_embeddings; "
        "pass --train-len N"
    )


def default_inv_freq(theta: float, rotary_dim: int) -> torch.Tensor:
    """RoPE's θ_i = b^(-2i/d), written as transformers writes it so equal bases give equal bits."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def no_rope_error(arch: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"model type {arch!r} has no rotary position embedding (no module with an inv_freq buffer; e.g. GPT-2 uses "
        "learned absolute positions, GPT-J a fixed sin/cos table), so RoPE variants do not apply"
    )


def rope_info_of(model: nn.Module, rotary: Rotary, train_len: int | None = None) -> RopeInfo:
    """Base, rotary dimension and training length of one rotary."""
    config = text_config(model)
    arch = getattr(config, "model_type", type(model).__name__)
    own = getattr(rotary.module, "config", None)  # a rotary built from its own config (Granite-SWA's per-layer θ)
    params = rope_parameters(own if own is not None and hasattr(own, "rope_parameters") else config,
                             rotary.layer_type)
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise UnsupportedModelError(f"{arch}: the config names no rope_theta for its rotary embedding "
                                    f"{type(rotary.module).__name__}, so lctx cannot recompute its frequencies")
    inv_freq = rotary.original_inv_freq.detach().float().cpu().clone()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return RopeInfo(arch=arch, theta=float(theta), rotary_dim=2 * inv_freq.numel(), head_dim=int(head_dim),
                    train_len=int(train_len) if train_len else training_length(config), inv_freq=inv_freq,
                    attention_scaling=rotary.attention_scaling, layer_type=rotary.layer_type)


def select(model: nn.Module, layers: str | None) -> list[Rotary]:
    """The rotaries a variant changes for ``layers`` (None: the model's own convention, see :data:`LAYERS`).

    Per-layer-type RoPE (one set of frequencies per layer type): the full-attention types by default, as
    Gemma 3's own long-context config scales only its global layers. One rotary serving every layer: that one.
    """
    found = rotaries(model)
    arch = getattr(text_config(model), "model_type", type(model).__name__)
    if not found:
        raise no_rope_error(arch)
    typed = [r for r in found if r.layer_type is not None]
    if layers in (None, "all") or not typed:
        if layers in ("full", "sliding") and not typed:
            return found  # one rotary for every layer: the caller restricts by attention module
        chosen = [r for r in typed if not r.local] if layers is None and typed else found
        return chosen or found
    chosen = [r for r in found if r.local == (layers == "sliding")]
    if not chosen:
        kinds = sorted({r.layer_type for r in typed})
        raise UnsupportedModelError(f"layers={layers}: {arch} has no {layers}-attention RoPE (its rotary layer "
                                    f"types: {', '.join(kinds)})")
    return chosen


def rope_infos(model: nn.Module, train_len: int | None = None, layers: str | None = None) -> list[tuple[Rotary,
                                                                                                        RopeInfo]]:
    """(rotary, info) for each rotary :func:`select` picks."""
    return [(r, rope_info_of(model, r, train_len)) for r in select(model, layers)]


def rope_info(model: nn.Module, train_len: int | None = None) -> RopeInfo:
    """Base, rotary dim and training length of the model's main rotary (full attention first)."""
    return rope_infos(model, train_len)[0][1]


def check_frequencies(info: RopeInfo, rotary: Rotary, rope_type: str) -> None:
    """Refuse a rotary whose frequencies are not θ^(−2i/d) for the config's θ (frequency variants recompute them),
    or whose cos/sin do not follow its frequency buffer."""
    if not reads_buffers(rotary):
        raise UnsupportedModelError(f"{info.arch}: {type(rotary.module).__name__} computes cos/sin without reading "
                                    "its inv_freq buffer, so lctx cannot change its frequencies")
    if rope_type != "default":
        return  # a checkpoint's own scaling (yarn, llama3, …): its unscaled base cannot be compared
    own = info.inv_freq
    expected = torch.where(own != 0, default_inv_freq(info.theta, info.rotary_dim), 0.0)
    if not torch.allclose(own, expected, rtol=1e-5, atol=0):
        raise UnsupportedModelError(
            f"{info.arch}: {type(rotary.module).__name__} holds frequencies that are not rope_theta^(-2i/d) for "
            f"rope_theta={info.theta:g}, d={info.rotary_dim}, so lctx cannot recompute them")


def reads_buffers(rotary: Rotary) -> bool:
    """Whether the rotary's cos/sin follow its ``inv_freq`` buffer (Phi-MoE's recomputes them from the config on
    every call, so rewriting the buffer would change nothing)."""
    buffer = rotary.inv_freq
    x = torch.zeros(1, device=buffer.device)
    position = torch.tensor([[3]], device=buffer.device)
    kwargs = {"layer_type": rotary.layer_type} if rotary.layer_type is not None else {}
    saved = buffer.detach().clone()
    rope_type = getattr(rotary.module, "rope_type", None)  # no dynamic/longrope update during the probe
    kept = dict(rope_type) if isinstance(rope_type, dict) else rope_type
    if isinstance(rope_type, dict):
        rope_type[rotary.layer_type] = "default"
    elif rope_type is not None:
        rotary.module.rope_type = "default"
    with torch.no_grad():
        try:
            before = rotary.module(x, position, **kwargs)
            buffer.mul_(0.5)
            after = rotary.module(x, position, **kwargs)
        finally:
            buffer.copy_(saved)
            if kept is not None:
                rotary.module.rope_type = kept
    pairs = zip(before if isinstance(before, tuple) else (before,), after if isinstance(after, tuple) else (after,),
                strict=True)
    return not all(torch.equal(a, b) for a, b in pairs)


def rope_type_of(model: nn.Module, rotary: Rotary) -> str:
    return str(rope_parameters(text_config(model), rotary.layer_type).get("rope_type", "default"))


# ---- the LM head's own post-processing ---------------------------------------------------------------------

class _Stub(nn.Module):
    """Stands in for a submodule during one call: returns what it is given to return, records its input, and
    reads every other attribute from the module it replaces (Falcon-H1's ``lm_head_multiplier``, head dtypes)."""

    def __init__(self, output: Any, like: nn.Module) -> None:
        super().__init__()
        self.output, self.seen = output, None
        object.__setattr__(self, "_like", like)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_like"), name)

    def forward(self, *args, **kwargs) -> Any:
        self.seen = args[0] if args else next(iter(kwargs.values()), None)
        return self.output


class _Hidden(dict):
    """A base-model output holding only ``last_hidden_state``; other fields read as None."""

    def __getattr__(self, name: str) -> Any:
        return self.get(name)

    def __getitem__(self, key: Any) -> Any:
        return self["last_hidden_state"] if key == 0 else dict.__getitem__(self, key)


def logits_processor(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(lm_head(hidden)) == model(ids).logits``: what the model's forward does after its output embedding.

    Taken from the model's own forward, not from a list: the forward runs with the base model returning the
    hidden states and the output embedding returning the logits given, so Cohere's ``logit_scale``, Granite's
    ``logits_scaling``, Gemma's final soft-cap (in the dtype the model uses) and anything else come out as the
    model computes them. Raises UnsupportedModelError when the model transforms the hidden states before its
    output embedding (ModernBERT-decoder's prediction head): then ``lm_head(hidden)`` is not the input to undo.
    """
    head = model.get_output_embeddings()
    base = base_model(model)
    if head is None or base is model:
        raise UnsupportedModelError(f"{type(model).__name__} has no separate output embedding to chunk the loss over")
    owner, name = _parent(model, head)
    base_owner, base_name = _parent(model, base)

    def process(logits: torch.Tensor) -> torch.Tensor:
        flat = logits.dim() == 2
        rows = logits[None] if flat else logits
        hidden = torch.zeros(*rows.shape[:-1], 1, device=rows.device, dtype=rows.dtype)
        head_stub, base_stub = _Stub(rows, head), _Stub(_Hidden(last_hidden_state=hidden), base)
        ids = torch.zeros(rows.shape[:-1], dtype=torch.long, device=rows.device)
        setattr(owner, name, head_stub)
        setattr(base_owner, base_name, base_stub)
        try:
            out = model(input_ids=ids, use_cache=False).logits
        except Exception as err:  # noqa: BLE001 - whatever the forward does to the stand-ins, it is a refusal
            raise _head_error(model, f"{type(err).__name__}: {err}") from None
        finally:
            setattr(owner, name, head)
            setattr(base_owner, base_name, base)
        seen = head_stub.seen
        if not isinstance(seen, torch.Tensor) or seen.shape != hidden.shape or seen.data_ptr() != hidden.data_ptr():
            raise _head_error(model, "its output embedding is not applied to the final hidden states as they are")
        return out[0] if flat else out

    return process


def _head_error(model: nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{type(model).__name__}: the chunked loss cannot reproduce the LM head ({why}); "
                                 "its forward transforms the hidden states before the output embedding")


def _parent(model: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for module in model.modules():
        for attr, sub in module.named_children():
            if sub is child:
                return module, attr
    raise UnsupportedModelError(f"{type(model).__name__}: cannot find where {type(child).__name__} is attached")


def logn_scale(positions: torch.Tensor, train_len: int) -> torch.Tensor:
    """Su's log-n factor max(1, ln n / ln L) for 0-based ``positions`` (n = position + 1)."""
    n = positions.to(torch.float32) + 1.0
    return torch.clamp(torch.log(n) / math.log(train_len), min=1.0)
