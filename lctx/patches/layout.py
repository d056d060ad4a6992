"""How each attention module rotates its queries and keys, learned by probing the model rather than from a list.

Attention-level variants rotate queries and keys again inside attention (by position differences), so they must
do it exactly as the model does: which dimensions rotate (all, the first part with partial rotary, the last part
with MLA's decoupled ``qk_rope_head_dim``), how they pair (``rotate_half`` halves, or interleaved pairs as in
GLM, Cohere, Llama 4 and DeepSeek-V2's complex form), with which rotary's frequencies (Gemma 3's layer types),
or not at all (SmolLM3's and Llama 4's NoPE layers, Cohere 2's global layers).

The probe runs one token through the model at position 0 and at position P and reads the queries and keys each
attention module hands to the attention function: with one token attention returns the value whatever the
rotation, so every layer sees the same input both times, and the two reads differ only by RoPE's rotation by P.
The layout is the one candidate that maps the first read onto the second.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lctx.patches.arch import Rotary, UnsupportedModelError, rotaries, text_config
from lctx.patches.seams import override_attention

PROBE_POSITION = 5
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → layouts (not copied with the model)


@dataclass(frozen=True)
class Layout:
    """Where RoPE sits in a head: ``pairs`` frequency pairs from dimension ``offset``, halves or interleaved,
    turning forward (``direction`` 1) or, as NanoChat's flipped ``rotate_half`` does, backward (−1)."""

    rotary: Rotary | None
    offset: int
    pairs: int
    interleaved: bool
    head_dim: int = 0  # of the queries and keys the module hands to attention (0: not probed)
    direction: int = 1

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two components of each rotating pair: (x1, x2) with x1·cos − x2·sin, x2·cos + x1·sin."""
        o, n = self.offset, self.pairs
        if self.interleaved:
            return x[..., o:o + 2 * n:2], x[..., o + 1:o + 2 * n:2]
        return x[..., o:o + n], x[..., o + n:o + 2 * n]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (…, D) rotated by angles whose cos/sin (broadcastable to …, pairs) are given; other dims copied.

        Written on the two components (x1·cos − x2·sin, x2·cos + x1·sin) into one new tensor, without
        rotate_half's copies; under autograd (which cannot record ``out=``) assembled from the pieces instead.
        """
        if self.direction < 0:
            sin = -sin
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, cos, sin)):
            return self._rotate_differentiable(x, cos, sin)
        out = torch.empty_like(x)
        (x1, x2), (o1, o2) = self.split(x), self.split(out)
        torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
        torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
        end = self.offset + 2 * self.pairs
        if self.offset:
            out[..., :self.offset] = x[..., :self.offset]
        if end < x.shape[-1]:
            out[..., end:] = x[..., end:]
        return out

    def _rotate_differentiable(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """:meth:`rotate` without in-place writes (``sin`` already signed by the direction)."""
        x1, x2 = self.split(x)
        r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        end = self.offset + 2 * self.pairs
        pairs = torch.stack([r1, r2], dim=-1).flatten(-2) if self.interleaved else torch.cat([r1, r2], dim=-1)
        return torch.cat([x[..., :self.offset], pairs, x[..., end:]], dim=-1)


def _candidates(rotary_list: list[Rotary], head_dim: int) -> list[Layout]:
    found = []
    for rotary in rotary_list:
        pairs = rotary.inv_freq.numel()
        for offset in sorted({0, head_dim - 2 * pairs}):
            if 0 <= offset and offset + 2 * pairs <= head_dim:
                found += [Layout(rotary, offset, pairs, interleaved, head_dim, direction)
                          for interleaved in (False, True) for direction in (1, -1)]
    return found


def _error(expected: torch.Tensor, got: torch.Tensor) -> float:
    expected, got = expected.float(), got.float()
    return float((expected - got).norm() / expected.norm().clamp(min=1e-30))


def _match(reads: list[tuple[torch.Tensor, torch.Tensor]], rotary_list: list[Rotary], tolerance: float,
           own: Callable[[Rotary], bool]) -> Layout | None | str:
    """The layout mapping the position-0 read onto the position-P read; None for NoPE; a reason if nothing fits.

    Rotaries with equal frequencies fit alike (OLMo 3's layer types share θ, Moshi has one per layer): the
    module's own (``own``: its layer type's, or one inside it) wins.
    """
    (q0, k0), (qp, kp) = reads
    if _error(qp, q0) < tolerance and _error(kp, k0) < tolerance:
        return None
    best, best_error = None, float("inf")
    for layout in _candidates(rotary_list, q0.shape[-1]):
        angle = PROBE_POSITION * layout.rotary.original_inv_freq.detach().float().to(q0.device)
        cos, sin = angle.cos(), angle.sin()
        error = max(_error(qp, layout.rotate(q0.float(), cos, sin)), _error(kp, layout.rotate(k0.float(), cos, sin)))
        if error < best_error or (error < tolerance and own(layout.rotary) and not own(best.rotary)):
            best, best_error = layout, min(error, best_error)
    if best is None or best_error >= tolerance:
        return (f"its queries and keys at position {PROBE_POSITION} are not those at position 0 rotated by any "
                f"rotary's frequencies in a layout lctx knows (best relative error {best_error:.2g})")
    return best


@contextlib.contextmanager
def _record_calls(rotary_list: list[Rotary], called: set[int]) -> Iterator[None]:
    modules = {id(r.module): r.module for r in rotary_list}
    hooks = [module.register_forward_pre_hook(lambda *_, key=key: called.add(key)) for key, module in modules.items()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def probe(model: nn.Module) -> dict[nn.Module, Layout | None]:
    """Each attention module's RoPE layout (None: the layer has no RoPE). Cached on the model.

    Raises UnsupportedModelError naming the module whose rotation matches no layout.
    """
    if model in _PROBED:
        return _PROBED[model]
    reads: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def hook(module, query, key, value, attention_mask, *, original, **kwargs):
        reads.setdefault(module, []).append((query[:1, :, -1:].detach().clone(), key[:1, :, -1:].detach().clone()))
        return original(module, query, key, value, attention_mask, **kwargs)

    config = text_config(model)
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    token = torch.tensor([[min(5, embeddings.weight.shape[0] - 1)]], device=device)
    rotary_list = rotaries(model)
    called = set()  # a model may hold rotaries it never calls (Granite-SWA's global one)
    with torch.no_grad(), override_attention(model, hook), _record_calls(rotary_list, called):
        for position in (0, PROBE_POSITION):
            model(input_ids=token, position_ids=torch.tensor([[position]], device=device), use_cache=False)
    rotary_list = [r for r in rotary_list if id(r.module) in called] or rotary_list
    arch = getattr(config, "model_type", type(model).__name__)
    if not reads:
        raise UnsupportedModelError(f"{arch}: no attention module reached the attention function on a probe "
                                    "forward, so lctx cannot patch attention")
    tolerance = 1e-3 if embeddings.weight.dtype == torch.float32 else 3e-2
    layouts: dict[nn.Module, Layout | None] = {}
    for module, pair in reads.items():
        if len(pair) != 2:
            raise UnsupportedModelError(f"{arch}: {type(module).__name__} calls the attention function "
                                        f"{len(pair) // 2} times per forward (e.g. differential attention), which "
                                        "lctx's attention-level variants do not patch")
        types = getattr(config, "layer_types", None) or ()
        index = getattr(module, "layer_idx", None)
        layer_type = types[index] if index is not None and index < len(types) else None
        inside = {id(m) for m in module.modules()}

        def own(rotary: Rotary, layer_type=layer_type, inside=inside) -> bool:
            return id(rotary.module) in inside or (rotary.layer_type is not None and rotary.layer_type == layer_type)

        found = _match(pair, rotary_list, tolerance, own)
        if isinstance(found, str):
            raise UnsupportedModelError(f"{arch}: {type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
                                        f": {found}")
        layouts[module] = found
    _PROBED[model] = layouts
    return layouts
