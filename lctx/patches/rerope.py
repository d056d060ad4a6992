"""The attention family: ReRoPE, Leaky ReRoPE and SelfExtend, exact and memory-linear, with cached decoding.

Each variant maps the query–key distance r = i − j to an effective relative position: r itself inside the
window (r < w), something bounded, compressed or (Leaky ReRoPE with k < 1, for training) stretched beyond it.
Since R(a)q · R(b)k depends only on b − a, the far part is "query rotated at fq(i), key rotated at gk(j)" and the
near part is ordinary RoPE, so each part is a plain attention over a band of keys. Both parts run per chunk of
query rows through a kernel that also returns the log-sum-exp, and are merged exactly; no length × length score
matrix exists, so memory grows linearly.

While patched, the model's rotary module is called at the far key position gk(p) of each position p (ReRoPE:
0, i.e. unrotated), so the model rotates queries and keys there in its own layout and the KV cache holds every
key as the far part reads it. Attention then rotates by differences, R(a)R(b) = R(a + b): near keys by
j − gk(j), queries by i − gk(i) (near) and fq(i) − gk(i) (far), in the layout the probe found for the module
(:mod:`lctx.patches.layout`: halves or interleaved pairs, all of the head or its rotary part). A decoding step
thus rotates only the keys inside the window, whatever the context length. Layers without RoPE are left alone.

Under autograd (training with ``lctx toy train --rope``) every part runs materialised instead of through the
fused kernels: their log-sum-exp carries no gradient, and the exact merge of the parts needs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lctx.patches import Family, Param, Variant, register, register_family
from lctx.patches.arch import RopeInfo, Rotary, UnsupportedModelError, layer_kind, rope_info_of, select
from lctx.patches.layout import Layout, probe
from lctx.patches.logn import scale_query
from lctx.patches.seams import override_attention, query_positions, rope_type_default

CHUNK_SIZE = 1024  # query rows per kernel call (at most the window − 1 on the mask-free CPU path)

# fq(query positions) and gk(key positions) of the far part: the query at fq(i) against the key at gk(j).
FarPositions = Callable[[torch.Tensor, torch.Tensor, Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor]]


def _rerope_far(pos_q: torch.Tensor, pos_k: torch.Tensor, p: Mapping[str, Any]):
    return torch.full_like(pos_q, p["window"]), torch.zeros_like(pos_k)


def _leaky_far(pos_q: torch.Tensor, pos_k: torch.Tensor, p: Mapping[str, Any]):
    w, k = p["window"], p["k"]
    return pos_q / k + w * (1 - 1 / k), pos_k / k


def _self_extend_far(pos_q: torch.Tensor, pos_k: torch.Tensor, p: Mapping[str, Any]):
    w, g = p["window"], p["group"]
    return torch.div(pos_q, g, rounding_mode="floor") + (w - w // g), torch.div(pos_k, g, rounding_mode="floor")


class _Rotation:
    """One rotary's RoPE (its frequencies) applied at mapped positions, in a module's layout.

    ``kind`` names the angle as a function of position p: "near" p − gk(p) and "far" fq(p) − gk(p), applied on
    top of the model's own rotation at gk(p) (unscaled: the model applied its cos/sin scale). For non-negative
    integer positions cos/sin come from a table per kind that grows as needed, so a decoding step looks its
    angles up instead of recomputing them.
    """

    def __init__(self, info: RopeInfo, far: FarPositions, params: Mapping[str, Any]) -> None:
        self.info, self.far, self.params = info, far, params
        self.inv_freq: dict[torch.device, torch.Tensor] = {}
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.plain = Layout(None, 0, info.rotary_dim // 2, False)  # rotate_half over the first rotary_dim dims

    def _compute(self, positions: torch.Tensor, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = positions.device
        if device not in self.inv_freq:
            self.inv_freq[device] = self.info.inv_freq.to(device)
        fq, gk = self.far(positions, positions, self.params)
        angle = {"near": positions - gk, "far": fq - gk}[kind]
        freqs = angle[..., None].float() * self.inv_freq[device]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def _table(self, kind: str, dtype: torch.dtype, device: torch.device,
               size: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (kind, dtype, device)
        if key not in self.tables or self.tables[key][0].shape[0] < size:
            grown = max(4096, 1 << (size - 1).bit_length())
            self.tables[key] = self._compute(torch.arange(grown, device=device), kind, dtype)
        return self.tables[key]

    def cos_sin(self, positions: torch.Tensor, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (..., rotary_dim / 2) of the ``kind`` angle at integer ``positions``."""
        if positions.numel() == 0 or int(positions.min()) < 0:
            return self._compute(positions, kind, dtype)
        cos, sin = self._table(kind, dtype, positions.device, int(positions.max()) + 1)
        return cos[positions], sin[positions]

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, kind: str, start: int | None = None,
                 layout: Layout | None = None) -> torch.Tensor:
        """x (B, H, T, D) rotated by the ``kind`` angle of positions (B, T), in ``layout`` (default: rotate_half).

        ``start`` says every row's positions are start, start + 1, …: the table is sliced instead of indexed.
        """
        length = x.shape[2]
        if start is not None and start >= 0:
            cos, sin = (t[None, None, start:start + length]
                        for t in self._table(kind, x.dtype, x.device, start + length))
        else:
            cos, sin = (t[:, None] for t in self.cos_sin(positions, kind, x.dtype))
        return (layout or self.plain).rotate(x, cos, sin)


MaskCache = dict[tuple, torch.Tensor]


def _band_mask(user: torch.Tensor | None, rows: tuple[int, int], keys: tuple[int, int],
               band: tuple[int, int] | None, like: torch.Tensor, cache: MaskCache) -> torch.Tensor | None:
    """Additive mask for query slots ``rows`` against key slots ``keys``: open where r_min ≤ r < r_max.

    Slots index the key axis (a query's own key slot is its row plus the cache offset), so r = row − key.
    ``user`` is the model's mask cut to these rows and keys; ``band=None`` means every key is within the band.
    The mask takes the dtype and device of ``like`` (the kernel wants the query's). Band-only masks depend on
    the geometry alone and repeat from chunk to chunk, so they are cached.
    """
    dtype, device = like.dtype, like.device
    low = torch.finfo(dtype).min  # not -inf: a row with no open key then gets lse ≈ min, weight 0 in the merge
    if band is None:
        if user is None:
            return None
        if user.dtype == torch.bool:
            return torch.zeros(user.shape, dtype=dtype, device=device).masked_fill_(~user, low)
        return user.to(dtype).clamp(min=low)
    (a, b), (lo, hi), (r_min, r_max) = rows, keys, band
    shape, shift = (b - a, hi - lo), a - lo  # r = shift + row − column
    key = (shape, shift - r_min, shift - r_max + 1)
    if key not in cache:
        allowed = torch.ones(shape, dtype=torch.bool, device=device).tril_(shift - r_min)
        cache[key] = allowed.triu_(shift - r_max + 1)
    allowed = cache[key]
    if user is None:
        additive = (*key, dtype)
        if additive not in cache:
            cache[additive] = torch.zeros(shape, dtype=dtype, device=device).masked_fill_(~allowed, low)[None, None]
        return cache[additive]
    if user.dtype == torch.bool:
        return torch.zeros(user.shape, dtype=dtype, device=device).masked_fill_(~(allowed & user), low)
    return user.to(dtype).clamp(min=low).masked_fill(~allowed, low)


def _segments(rows: tuple[int, int], keys: tuple[int, int],
              band: tuple[int, int]) -> list[tuple[tuple[int, int], tuple[int, int] | None]]:
    """Split key slots into runs every row sees whole (band ``None``: no band mask) and runs at the band edges.

    Key t is open to every row in [a, b) iff t ≤ a − r_min and t ≥ b − r_max; only the edges need a mask.
    """
    (a, b), (lo, hi), (r_min, r_max) = rows, keys, band
    dense_lo, dense_hi = max(lo, b - r_max), min(hi, a - r_min + 1)
    if dense_lo >= dense_hi:
        return [(keys, band)]
    runs = [((lo, dense_lo), band), ((dense_lo, dense_hi), None), ((dense_hi, hi), band)]
    return [(run, edge) for run, edge in runs if run[1] > run[0]]


def _materialized(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                  softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over one chunk with its scores in memory: for softcap, devices without a kernel, autograd.

    The log-sum-exp comes from the softmax, s_j − log w_j at each row's largest score (exact, and differentiable
    through the softmax): ``torch.logsumexp`` and ``exp`` take a slow path on the masked scores (dtype min),
    which made training under the ReRoPE family twice as slow.
    """
    b, h, t, d = q.shape
    groups = k.shape[1]
    scores = (q.reshape(b, groups, -1, d) @ k.transpose(-1, -2)).float() * scale
    scores = scores.view(b, groups, h // groups, t, -1)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask[:, :, None]
    weights = torch.softmax(scores, dim=-1)
    lse = scores.amax(-1) - torch.log(weights.amax(-1))
    weights = weights.to(v.dtype).view(b, groups, -1, scores.shape[-1])
    return (weights @ v).view(b, h, t, -1), lse.view(b, h, t)


def _same_width(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Zero-pad the narrower of q/k and v (MLA: value heads differ from query-key heads), which fused kernels
    need equal; zeros change neither scores nor outputs, the caller cuts the output back to v's width."""
    dq, dv = q.shape[-1], v.shape[-1]
    if dv < dq:
        v = torch.nn.functional.pad(v, (0, dq - dv))
    elif dq < dv:
        q, k = (torch.nn.functional.pad(t, (0, dv - dq)) for t in (q, k))
    return q, k, v


def _cpu_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    width = v.shape[-1]
    q, k, v = _same_width(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p=0.0, is_causal=causal, attn_mask=mask, scale=scale)
    return out[..., :width], lse


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records this call: the fused kernels return a log-sum-exp without gradient, so they
    would leave out the merge's dependence on it (silently wrong gradients)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, Hq, T, D) over k, v (B, Hkv, S, D) with an additive mask: (output, log-sum-exp)."""
    if _needs_grad(q, k, v):
        return _materialized(q, k, v, mask, scale, softcap)
    if softcap is None and q.device.type == "cpu":
        return _cpu_flash(q, k, v, mask, False, scale)
    if softcap is None and q.device.type == "cuda":
        rep, width = q.shape[1] // k.shape[1], v.shape[-1]
        q, k, v = _same_width(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1))
        if mask is not None:  # the kernel wants the bias row stride aligned to 16 elements, and all heads
            width = -(-mask.shape[-1] // 16) * 16
            aligned = mask.new_empty(*mask.shape[:-1], width)[..., : mask.shape[-1]]
            mask = aligned.copy_(mask).expand(q.shape[0], q.shape[1], -1, -1)
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask, True, dropout_p=0.0, is_causal=False, scale=scale)
        return out[..., :width], lse[..., : q.shape[2]]
    return _materialized(q, k, v, mask, scale, softcap)


def _merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
           lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over the union of two disjoint key sets, from each set's output and log-sum-exp (fp32)."""
    lse = torch.logaddexp(lse1, lse2)
    return torch.lerp(o1.float(), o2.float(), torch.exp(lse2 - lse)[..., None]), lse


def _band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, user: torch.Tensor | None,
                    rows: tuple[int, int], keys: tuple[int, int], band: tuple[int, int], scale: float,
                    softcap: float | None, cache: MaskCache) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of query slots ``rows`` against key slots ``keys`` (k, v begin at slot ``start``), in ``band``."""
    result = None
    for (lo, hi), edge in _segments(rows, keys, band):
        mask = _band_mask(None if user is None else user[..., lo:hi], rows, (lo, hi), edge, q, cache)
        part = _partial_attention(q, k[:, :, lo - start:hi - start], v[:, :, lo - start:hi - start], mask, scale,
                                  softcap)
        result = part if result is None else _merge(*result, *part)
    return result


Piece = tuple[tuple[int, int], tuple[int, int], str]  # query slots, key slots, "dense" | "causal" | "reversed"


def _causal_pieces(rows: tuple[int, int], keys: tuple[int, int], band: tuple[int, int]) -> list[Piece] | None:
    """Cover a band without masks: a dense run plus triangles that the kernel's causal flag expresses.

    The flag is top-left aligned (row t of a call sees key s ≤ t). The upper edge of the band (row i sees
    j ≤ i − r_min) is such a triangle on rows [k0 + r_min, b); the lower edge (j ≥ i − r_max + 1) is one with
    rows and keys reversed. Each edge takes one key of the dense run to be exact, so the chunk must be
    narrower than the band; None means it is not, and the caller uses masks. ``keys`` must lie within the
    band's reach, [a − r_max + 1, b − r_min). The pieces covering every row come first.
    """
    (a, b), (lo, hi), (r_min, r_max) = rows, keys, band
    if b - a >= r_max - r_min:
        return None
    first: list[Piece] = []
    dense_lo, dense_hi = max(lo, b - r_max), min(hi, a - r_min + 1)
    if lo < min(hi, b - r_max):  # keys the later rows of the chunk no longer reach
        dense_lo = b - r_max + 1
        if dense_lo > hi:
            return None
        first.append(((a, b), (lo, dense_lo), "reversed"))
    upper = None
    if max(lo, a - r_min + 1) < min(hi, b - r_min):  # keys the earlier rows do not reach yet
        dense_hi = max(lo, a - r_min)
        upper = ((dense_hi + r_min, b), (dense_hi, min(hi, b - r_min)), "causal")
    if dense_lo < dense_hi:
        first.append(((a, b), (dense_lo, dense_hi), "dense"))
    return first + ([upper] if upper else [])


def _causal_band(acc: tuple[torch.Tensor, torch.Tensor] | None, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, start: int, a: int, pieces: list[Piece],
                 scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention of query slots from ``a`` on (q holds them) over ``pieces`` (k, v begin at slot ``start``).

    Merged into ``acc`` (fp32 output, log-sum-exp), which is updated in place and returned.
    """
    for (r0, r1), (lo, hi), kind in pieces:
        qs, ks, vs = q[:, :, r0 - a:r1 - a], k[:, :, lo - start:hi - start], v[:, :, lo - start:hi - start]
        if kind == "reversed":
            qs, ks, vs = qs.flip(2), ks.flip(2), vs.flip(2)
        part, part_lse = _cpu_flash(qs, ks, vs, None, kind != "dense", scale)
        if kind == "reversed":
            part, part_lse = part.flip(2), part_lse.flip(-1)
        skip = r0 - a
        if acc is None:
            out = part.float()
            lse = part_lse
            if skip:  # rows before r0 have no key yet: empty, weight 0 in later merges
                out = torch.cat([out.new_zeros(*out.shape[:2], skip, out.shape[-1]), out], dim=2)
                lse = torch.cat([lse.new_full((*lse.shape[:2], skip), torch.finfo(lse.dtype).min), lse], dim=2)
            acc = out, lse
        else:
            out, lse = acc[0].float(), acc[1]  # fp32 already, unless the near part came from the masked path
            out[:, :, skip:], lse[:, :, skip:] = _merge(out[:, :, skip:], lse[:, :, skip:], part, part_lse)
            acc = out, lse
    return acc


def _one_row(near: tuple[torch.Tensor, torch.Tensor], far: tuple[torch.Tensor, torch.Tensor] | None,
             value: torch.Tensor, mask: torch.Tensor | None, scale: float, softcap: float | None,
             sink: torch.Tensor | None = None) -> torch.Tensor:
    """A single query row (a decoding step): far and near scores side by side, one softmax, (B, Hq, 1, D).

    ``near`` and ``far`` are (query, keys) pairs; the far keys and then the near keys are consecutive cache slots,
    whose values ``value`` holds in that order. The scores, (B, Hq, keys), are as small as the cache.
    """
    q, k = near
    b, heads, _, d = q.shape
    groups = k.shape[1]  # query heads of one key head are consecutive: group them as rows of that key head
    parts = [near] if far is None else [far, near]
    scores = torch.cat([q.reshape(b, groups, -1, d) @ k.transpose(-1, -2) for q, k in parts], dim=-1).float() * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        mask = mask[:, :, 0]  # (B, 1 or Hq, keys)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)
        scores = scores + mask.float().reshape(b, 1 if mask.shape[1] == 1 else groups, -1, mask.shape[-1])
    if sink is not None:  # a column of per-head sink logits, dropped after the softmax
        column = sink.float().view(1, groups, heads // groups, 1).expand(b, -1, -1, 1)
        weights = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1].to(value.dtype)
    else:
        weights = torch.softmax(scores, dim=-1).to(value.dtype)
    return (weights @ value).view(b, heads, 1, -1)


def windowed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, *, rotate: _Rotation, params: Mapping[str, Any],
                       layout: Layout | None = None, scaling: float | None = None, softcap: float | None = None,
                       sliding_window: int | None = None, s_aux: torch.Tensor | None = None,
                       sinks: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention over q (B, Hq, Tq, D) and k, v (B, Hkv, Tk, D) rotated at gk(position) by the patched rotary
    module: RoPE inside the window, the far map beyond.

    Keys are the whole cache, the queries its last Tq slots; key slot t sits at position
    ``position_ids[:, -1] − (Tk − 1 − t)``, which holds for prefill, cached decoding and left padding.
    ``s_aux``/``sinks`` (gpt-oss) are per-head logits of a key with no value, in every row's softmax.
    Returns the output as (B, Tq, Hq, Dv), like transformers' attention functions, and no weights.
    """
    sink = s_aux if s_aux is not None else sinks
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    offset = k_len - q_len
    scale = scaling if scaling is not None else head_dim**-0.5
    window = params["window"]
    reach = sliding_window or k_len  # keys at distance ≥ reach are masked by the model itself
    positions = query_positions(kwargs, query)
    if params["logn"]:
        query = scale_query(query, positions, rotate.info.train_len)
    pos_k = positions[:, -1:] - (k_len - 1) + torch.arange(k_len, device=query.device)
    pos_q = pos_k[:, offset:]
    first = pos_k[:, 0]  # every row's key slots at consecutive positions: one start for all rows, if they agree
    start = int(first[0]) if batch == 1 or bool((first == first[0]).all()) else None

    near_lo = max(0, offset - min(window, reach) + 1)  # the first key any query sees within the window
    q_near = rotate(query, pos_q, "near", None if start is None else start + offset, layout)
    k_near = rotate(key[:, :, near_lo:], pos_k[:, near_lo:], "near", None if start is None else start + near_lo,
                    layout)
    v_near = value[:, :, near_lo:]
    far_lo, far_hi = max(0, offset - reach + 1), k_len - window if window < reach else 0
    if far_hi > far_lo:
        q_far = rotate(query, pos_q, "far", None if start is None else start + offset, layout)
        k_far = key[:, :, far_lo:far_hi]  # as cached: rotated at gk(j)
        v_far = value[:, :, far_lo:far_hi]

    if q_len == 1:
        lo = far_lo if far_hi > far_lo else near_lo
        out = _one_row((q_near, k_near), (q_far, k_far) if far_hi > far_lo else None, value[:, :, lo:],
                       None if attention_mask is None else attention_mask[..., lo:], scale, softcap, sink)
        return out.transpose(1, 2), None

    out = query.new_empty(batch, q_len, heads, value.shape[-1])
    cache: MaskCache = {}
    near_band, far_band = (0, min(window, reach)), (window, reach)
    # Without a model mask or softcap, the CPU kernel's causal flag replaces every mask (see _causal_pieces);
    # not under autograd, which needs the materialised parts (see _needs_grad).
    mask_free = (attention_mask is None and softcap is None and query.device.type == "cpu"
                 and not _needs_grad(query, key, value))
    chunk = min(CHUNK_SIZE, max(1, near_band[1] - 1)) if mask_free else CHUNK_SIZE
    for a in range(0, q_len, chunk):
        b = min(a + chunk, q_len)
        rows = (offset + a, offset + b)
        user = None if attention_mask is None else attention_mask[:, :, a:b]
        near = (max(near_lo, rows[0] - near_band[1] + 1), rows[1])
        far_keys = (max(far_lo, rows[0] - reach + 1), min(far_hi, rows[1] - window))
        pieces = _causal_pieces(rows, near, near_band) if mask_free else None
        if pieces is None:
            acc = _band_attention(q_near[:, :, a:b], k_near, v_near, near_lo, user, rows, near, near_band, scale,
                                  softcap, cache)
        else:
            acc = _causal_band(None, q_near[:, :, a:b], k_near, v_near, near_lo, rows[0], pieces, scale)
        if far_keys[1] > far_keys[0]:
            pieces = _causal_pieces(rows, far_keys, far_band) if mask_free else None
            if pieces is None:
                far_out, far_lse = _band_attention(q_far[:, :, a:b], k_far, v_far, far_lo, user, rows, far_keys,
                                                   far_band, scale, softcap, cache)
                acc = _merge(*acc, far_out, far_lse)
            else:
                acc = _causal_band(acc, q_far[:, :, a:b], k_far, v_far, far_lo, rows[0], pieces, scale)
        if sink is not None:  # the sink's share of each row's softmax leaves the keys' outputs scaled down
            sink_lse = sink.float().view(1, -1, 1).expand_as(acc[1])
            acc = acc[0] * torch.exp(acc[1] - torch.logaddexp(acc[1], sink_lse))[..., None], acc[1]
        out[:, a:b] = acc[0].transpose(1, 2)
    return out, None


@contextlib.contextmanager
def far_rotated(rotaries: list[Rotary], far: FarPositions, params: Mapping[str, Any]) -> Iterator[None]:
    """Call each rotary module at the far key position gk(p) of the positions it is given (its own cos/sin layout,
    dtype and scale); a module serving several layer types does so for the types in ``rotaries`` only."""
    types: dict[int, set[str | None]] = {}
    modules = {}
    for rotary in rotaries:
        types.setdefault(id(rotary.module), set()).add(rotary.layer_type)
        modules[id(rotary.module)] = rotary.module
    saved = {key: module.__dict__.get("forward") for key, module in modules.items()}

    def wrap(module: nn.Module, chosen: set[str | None]) -> None:
        original = module.forward

        def forward(x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
            layer_type = kwargs.get("layer_type", args[0] if args else None)
            if layer_type in chosen:
                position_ids = far(position_ids, position_ids, params)[1]
            return original(x, position_ids, *args, **kwargs)

        module.forward = forward

    try:
        for key, module in modules.items():
            wrap(module, types[key])
        yield
    finally:
        for key, module in modules.items():
            if saved[key] is None:
                del module.forward
            else:
                module.forward = saved[key]


def _restore(rotate: _Rotation, layout: Layout, module, query, key, value, attention_mask, *, original, **kwargs):
    """A layer the variant leaves alone whose rotary is far-rotated: rotate back to the true positions."""
    positions = query_positions(kwargs, query)
    pos_k = positions[:, -1:] - (key.shape[2] - 1) + torch.arange(key.shape[2], device=query.device)
    query = rotate(query, positions, "near", None, layout)
    key = rotate(key, pos_k, "near", None, layout)
    return original(module, query, key, value, attention_mask, **kwargs)


def _patcher(far: FarPositions):
    @contextlib.contextmanager
    def patch(model: nn.Module, info: RopeInfo, params: Mapping[str, Any], seq_len: int | None) -> Iterator[None]:
        layouts = probe(model)
        layers = params.get("layers")
        allowed = set(select(model, layers))
        chosen = {m for m, layout in layouts.items() if layout is not None and layout.rotary in allowed
                  and (layers not in ("full", "sliding") or layer_kind(model, m) == layers)}
        if not chosen:
            raise UnsupportedModelError(f"{info.arch}: no {'' if layers in (None, 'all') else layers + '-attention '}"
                                        "layer with RoPE for an attention-level variant to change")
        far_rotaries = {layouts[m].rotary for m in chosen}
        rotations = {r: _Rotation(rope_info_of(model, r, info.train_len), far, params) for r in far_rotaries}

        def hook(module, query, key, value, attention_mask, *, original, **kwargs):
            layout = layouts.get(module)
            if module in chosen:
                return windowed_attention(module, query, key, value, attention_mask, rotate=rotations[layout.rotary],
                                          params=params, layout=layout, **kwargs)
            if layout is not None and layout.rotary in far_rotaries:
                return _restore(rotations[layout.rotary], layout, module, query, key, value, attention_mask,
                                original=original, **kwargs)
            return original(module, query, key, value, attention_mask, **kwargs)

        with (rope_type_default(list(far_rotaries)), far_rotated(list(far_rotaries), far, params),
              override_attention(model, hook)):
            yield

    return patch


def _resolve_window(values: dict[str, Any], train_len: int) -> None:
    if values.get("window") is None:
        values["window"] = max(1, train_len // 4)


register_family(Family("rerope", "#6A3D9A", ("*", "h"), "relative positions capped or slowed beyond a window"))
register_family(Family("self-extend", "#8C564B", ("p",), "grouped positions beyond a neighbour window"))
WINDOW = Param("window", int, None, "keys closer than this keep plain RoPE; default training length / 4", ge=1)
SU = "Su 2023, 'Rectified Rotary Position Embeddings', kexue.fm/archives/9708"

for _name, _family, _far, _description, _reference, _params in (
    ("rerope", "rerope", _rerope_far, "relative position capped at the window w: min(r, w)", SU, (WINDOW,)),
    ("leaky-rerope", "rerope", _leaky_far,
     "beyond the window w, relative position grows 1/k per token: w + (r − w)/k; k > 1 compresses (at inference), "
     "k < 1 stretches (Su's inverse use: train with it, run plain RoPE longer)",
     SU + "; inverse use: Su 2023, kexue.fm/archives/9728",
     (WINDOW, Param("k", float, 16.0, "slope divisor beyond the window: far positions advance 1/k per token "
                    "(1 reproduces RoPE, < 1 for training)", gt=0))),
    ("self-extend", "self-extend", _self_extend_far,
     "neighbour window w with plain RoPE; beyond it, grouped positions (⌊i/G⌋ + w − ⌊w/G⌋) − ⌊j/G⌋",
     "Jin et al. 2024, 'LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning' (arXiv:2401.01325)",
     (Param("group", int, 8, "group size G of the far positions (1 reproduces RoPE)", ge=1), WINDOW)),
):
    register(Variant(name=_name, description=_description, reference=_reference, params=_params,
                     patch=_patcher(_far), kind="attention", family=_family, length_dependent=False,
                     resolve=_resolve_window))
