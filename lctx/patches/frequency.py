"""The frequency family: variants that only change RoPE's per-dimension frequencies (and cos/sin scale).

Each variant is one function ``(info, params, length) -> (inv_freq, attention_scaling)``, like transformers'
``ROPE_INIT_FUNCTIONS``; ``length`` is the sequence length the forward covers (used by dynamic variants only).
Frequencies are derived from the model's rope_theta and rotary dimension, replacing any scaling a checkpoint
already carries; ``none`` keeps the model as trained.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lctx.patches import Family, Param, SpecError, Variant, register, register_family
from lctx.patches.arch import (
    RopeInfo,
    Rotary,
    UnsupportedModelError,
    attention_modules,
    check_frequencies,
    default_inv_freq,
    layer_kind,
    rope_infos,
    rope_parameters,
    rope_type_of,
    text_config,
)
from lctx.patches.logn import scaled_attention
from lctx.patches.seams import override_rotary

Frequencies = tuple[torch.Tensor, float]
FACTOR = Param("factor", float, None, "scale s = target length / training length (1 reproduces the model)",
               required=True, ge=1)
BETA_FAST = Param("beta_fast", float, 32.0, "YaRN: dimensions rotating more than this many times in L keep RoPE",
                  gt=0)
BETA_SLOW = Param("beta_slow", float, 1.0, "YaRN: dimensions rotating fewer times than this are interpolated",
                  gt=0)


def _base(info: RopeInfo) -> torch.Tensor:
    return default_inv_freq(info.theta, info.rotary_dim)


def _check_betas(values: dict[str, Any]) -> None:
    if values.get("beta_fast") is not None and values["beta_fast"] <= values["beta_slow"]:
        raise SpecError(f"beta_fast={values['beta_fast']:g} must be greater than beta_slow={values['beta_slow']:g} "
                        "(the ramp runs from the fast-rotating dimensions, kept, to the slow ones, interpolated)")


def _check_bands(values: dict[str, Any]) -> None:
    if values["high_freq_factor"] <= values["low_freq_factor"]:
        raise SpecError(f"llama3: high_freq_factor={values['high_freq_factor']:g} must be greater than "
                        f"low_freq_factor={values['low_freq_factor']:g} (they bound the blended wavelength band)")


def pi(info: RopeInfo, p: Mapping[str, Any], length: int) -> Frequencies:
    return _base(info) / p["factor"], 1.0


def _exponent(d: int) -> float:
    """NTK's base exponent d/(d−2): the lowest frequency pair scaled by exactly α."""
    if d <= 2:
        raise UnsupportedModelError(f"NTK-aware scaling needs a rotary dimension above 2 (this rotary has {d})")
    return d / (d - 2)


def ntk(info: RopeInfo, p: Mapping[str, Any], length: int) -> Frequencies:
    d = info.rotary_dim
    return default_inv_freq(info.theta * p["alpha"] ** _exponent(d), d), 1.0


def ntk_mixed(info: RopeInfo, p: Mapping[str, Any], length: int) -> Frequencies:
    half = info.rotary_dim // 2
    beta = p["beta"]
    a = math.log(p["factor"]) / half**beta
    i = torch.arange(half, dtype=torch.float64)
    return (_base(info).double() * torch.exp(-a * (i + 1) ** beta)).float(), 1.0


def dynamic_ntk(info: RopeInfo, p: Mapping[str, Any], length: int) -> Frequencies:
    s, big_l, d = p["factor"], info.train_len, info.rotary_dim
    if length <= big_l:
        return _base(info), 1.0
    return default_inv_freq(info.theta * ((s * length / big_l) - (s - 1)) ** _exponent(d), d), 1.0


def _ramp_between(info: RopeInfo, factor: float, beta_fast: float, beta_slow: float) -> torch.Tensor:
    """YaRN's NTK-by-parts: per dimension, interpolate by ``factor`` (low frequencies) or keep (high)."""
    d, base = info.rotary_dim, info.theta
    if factor == 1:  # the ramp below is the model only up to rounding; factor 1 must be it bit-exactly
        return _base(info)

    def dim_of(rotations: float) -> float:  # dimension that turns ``rotations`` times over the training length
        return d * math.log(info.train_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 where the dimension keeps its original frequency
    freq = _base(info)
    return (freq / factor) * (1 - keep) + freq * keep


def _mscale(factor: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def ntk_by_parts(info: RopeInfo, p: Mapping[str, Any], length: int) -> Frequencies:
    return _ramp_between(info, p["factor"], p["beta_fast"], p["beta_slow"]), 1.0


def yarn(info: RopeInfo, p: Mapping[str, Any], length: int) -> Frequencies:
    return _ramp_between(info, p["factor"], p["beta_fast"], p["beta_slow"]), p["attention_factor"]


def dynamic_yarn(info: RopeInfo, p: Mapping[str, Any], length: int) -> Frequencies:
    factor = max(1.0, length / info.train_len)
    return _ramp_between(info, factor, p["beta_fast"], p["beta_slow"]), _mscale(factor)


def llama3(info: RopeInfo, p: Mapping[str, Any], length: int) -> Frequencies:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    freq = _base(info)
    if factor == 1:  # the blend below is the model only up to rounding; factor 1 must be it bit-exactly
        return freq, 1.0
    wavelen = 2 * math.pi / freq
    low_wavelen, high_wavelen = info.train_len / low, info.train_len / high
    smooth = (info.train_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * freq / factor + smooth * freq
    out = torch.where(wavelen > low_wavelen, freq / factor, freq)
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(middle, blended, out), 1.0


def base(info: RopeInfo, p: Mapping[str, Any], length: int) -> Frequencies:
    return default_inv_freq(p["theta"], info.rotary_dim), 1.0


def _deepseek_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def deepseek_yarn(info: RopeInfo, p: Mapping[str, Any], length: int) -> Frequencies:
    factor = p["factor"]
    scaling = _deepseek_mscale(factor, p["mscale"]) / _deepseek_mscale(factor, p["mscale_all_dim"])
    return _ramp_between(info, factor, p["beta_fast"], p["beta_slow"]), scaling


def deepseek_softmax(model: nn.Module, info: RopeInfo, p: Mapping[str, Any]) -> float:
    """DeepSeek's softmax-scale factor mscale(s, mscale_all_dim)², relative to the one the checkpoint carries.

    DeepSeek-V2/V3 put YaRN's temperature on the softmax scale, which covers the position-free part of each MLA
    head too; their attention modules already multiply it in for a checkpoint that ships YaRN.
    """
    own = rope_parameters(text_config(model))
    carried = 1.0
    if own.get("rope_type", "default") != "default" and own.get("mscale_all_dim") and own.get("factor"):
        carried = _deepseek_mscale(own["factor"], own["mscale_all_dim"]) ** 2
    return _deepseek_mscale(p["factor"], p["mscale_all_dim"]) ** 2 / carried


def longrope(info: RopeInfo, p: Mapping[str, Any], length: int) -> Frequencies:
    """Per-dimension factors: the short ones up to the training length, the long ones past it (as transformers)."""
    factors = p["long_factor"] if length > info.train_len else p["short_factor"]
    d = info.rotary_dim
    ext = torch.tensor(factors, dtype=torch.float32)
    return 1.0 / (ext * info.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)), p["attention_factor"]


def longrope_factors(model: nn.Module, rotary: Rotary, info: RopeInfo,
                     p: Mapping[str, Any]) -> Mapping[str, Any]:
    """The checkpoint's short and long factors when the spec gives none; their count checked against the model."""
    if p.get("short_factor") is None:
        own = rope_parameters(text_config(model), rotary.layer_type)
        if own.get("short_factor") is None or own.get("long_factor") is None:
            raise UnsupportedModelError(f"longrope: {info.arch}'s config has no short_factor/long_factor; give them "
                                        "in the spec (longrope:factor=4:short_factor=[…]:long_factor=[…])")
        p = {**p, "short_factor": list(own["short_factor"]), "long_factor": list(own["long_factor"])}
    if len(p["short_factor"]) != info.rotary_dim // 2:
        raise UnsupportedModelError(f"longrope: {len(p['short_factor'])} factors given, {info.arch} rotates "
                                    f"{info.rotary_dim // 2} frequency pairs")
    return p


def proportional(info: RopeInfo, p: Mapping[str, Any], length: int) -> Frequencies:
    """The first ``fraction`` of the frequency pairs keep θ^(−2i/d) / factor, the rest stop rotating."""
    d = info.rotary_dim
    rotating = int(p["fraction"] * d // 2)
    inv_freq = 1.0 / (info.theta ** (torch.arange(0, 2 * rotating, 2, dtype=torch.int64).float() / d))
    return torch.cat((inv_freq, torch.zeros(d // 2 - rotating))) / p["factor"], 1.0


Complete = Callable[[nn.Module, Rotary, RopeInfo, Mapping[str, Any]], Mapping[str, Any]]


def _patcher(fn: Callable[[RopeInfo, Mapping[str, Any], int], Frequencies] | None, length_dependent: bool,
             softmax: Callable[[nn.Module, RopeInfo, Mapping[str, Any]], float] | None = None,
             complete: Complete | None = None):
    """A patch that sets ``fn``'s frequencies on the rotaries ``layers`` selects; ``softmax`` scales attention;
    ``complete`` fills parameters that come from the checkpoint (longrope's factors)."""

    @contextlib.contextmanager
    def patch(model: nn.Module, info: RopeInfo, params: Mapping[str, Any], seq_len: int | None) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if fn is not None:
                chosen = chosen_rotaries(model, info.train_len, params.get("layers"))
                fill = complete or (lambda model, rotary, rotary_info, params: params)
                stack.enter_context(override_rotary(
                    [(rotary, _frequencies(fn, rotary_info, fill(model, rotary, rotary_info, params)))
                     for rotary, rotary_info in chosen], seq_len, length_dependent))
            factor = 1.0 if softmax is None else softmax(model, info, params)
            if params["logn"] or factor != 1.0:
                stack.enter_context(scaled_attention(model, info.train_len if params["logn"] else None, factor))
            yield

    return patch


def _frequencies(fn: Callable[[RopeInfo, Mapping[str, Any], int], Frequencies], info: RopeInfo,
                 params: Mapping[str, Any]) -> Callable[[int], Frequencies]:
    """``fn`` for one rotary; dimensions the model keeps position-free (zero frequency) stay so."""
    keep = info.inv_freq != 0

    def frequencies(length: int) -> Frequencies:
        inv_freq, scaling = fn(info, params, length)
        return (inv_freq if bool(keep.all()) else torch.where(keep, inv_freq, 0.0)), scaling

    return frequencies


def chosen_rotaries(model: nn.Module, train_len: int, layers: str | None) -> list[tuple[Rotary, RopeInfo]]:
    """The rotaries a frequency variant rewrites, each checked to hold θ^(−2i/d) frequencies lctx can recompute.

    A ``layers`` choice that would need one rotary to serve some of its layers and not others is refused.
    """
    chosen = rope_infos(model, train_len, layers)
    if layers in ("full", "sliding") and any(rotary.layer_type is None for rotary, _ in chosen):
        kinds = {layer_kind(model, m) for m in attention_modules(model)}
        arch = chosen[0][1].arch
        if layers not in kinds:
            raise UnsupportedModelError(f"layers={layers}: {arch} has no {layers}-attention layers")
        if kinds != {layers}:
            raise UnsupportedModelError(
                f"layers={layers}: {arch}'s sliding and full-attention layers share one rotary embedding, so a "
                "frequency variant changes both (use layers=all, or an attention-level variant)")
    for rotary, info in chosen:
        check_frequencies(info, rotary, rope_type_of(model, rotary))
    return chosen


def _ntk_resolve(values: dict[str, Any], train_len: int) -> None:
    if values.get("alpha") is None:
        values["alpha"] = values.get("factor")
    if values.get("alpha") is None:
        raise SpecError("ntk: give alpha=… or factor=… (or --target-len). Grammar: ntk:alpha=4 or ntk:factor=4")
    values["factor"] = None  # folded into alpha, so ntk:factor=4 and ntk:alpha=4 share results


def _longrope_resolve(values: dict[str, Any], train_len: int) -> None:
    factor = values.get("factor")
    if values.get("attention_factor") is None and factor is not None:
        values["attention_factor"] = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(train_len))


def _check_longrope(values: dict[str, Any]) -> None:
    short, long = values.get("short_factor"), values.get("long_factor")
    if (short is None) != (long is None):
        raise SpecError("longrope: give both short_factor=[…] and long_factor=[…], or neither (the checkpoint's)")
    if short is not None and len(short) != len(long):
        raise SpecError(f"longrope: short_factor has {len(short)} values and long_factor {len(long)}; both need one "
                        "per frequency pair (rotary dimension / 2)")


def _yarn_resolve(values: dict[str, Any], train_len: int) -> None:
    if values.get("attention_factor") is None and values.get("factor") is not None:
        values["attention_factor"] = _mscale(values["factor"])


FrequencyFunction = Callable[[RopeInfo, Mapping[str, Any], int], Frequencies]
_FUNCTIONS: dict[str, FrequencyFunction | None] = {}


def frequency_function(name: str) -> FrequencyFunction | None:
    """A frequency variant's ``(info, params, length) -> (inv_freq, attention_scaling)``; None for ``none``.

    For analyses that need a variant's frequencies without patching a model (``lctx analyze``).
    """
    return _FUNCTIONS[name]


def _freq(name: str, fn, description: str, reference: str, params: tuple[Param, ...], *, family: str,
          length_dependent: bool = False, aliases: tuple[str, ...] = (), resolve=None, validate=None,
          softmax=None, complete=None) -> None:
    _FUNCTIONS[name] = fn
    register(Variant(
        name=name, description=description, reference=reference, params=params,
        patch=_patcher(fn, length_dependent, softmax, complete), kind="frequency", family=family,
        length_dependent=length_dependent, aliases=aliases, resolve=resolve, validate=validate,
    ))


# Hues from the Okabe–Ito and Tol colour-blind-safe palettes; the model as trained is black.
for _family in (
    Family("none", "#000000", ("o",), "the model as trained"),
    Family("pi", "#0072B2", ("s", "H"), "position interpolation: every frequency scaled alike"),
    Family("ntk", "#E69F00", ("^", "v", "<"), "NTK-aware: a larger base, dynamic or mixed"),
    Family("yarn", "#009E73", ("D", ">", "d", "1"), "NTK-by-parts: per-dimension ramp (YaRN)"),
    Family("llama3", "#882255", ("P",), "Llama-3.1 wavelength bands"),
    Family("base", "#44AA99", ("X",), "a new rope_theta"),
    Family("longrope", "#CC6677", ("8",), "per-dimension factors searched for the model (LongRoPE)"),
):
    register_family(_family)

_freq("none", None, "the model as trained", "Su et al. 2021, RoFormer (arXiv:2104.09864)", (), family="none")
_freq("pi", pi, "Position Interpolation: every frequency divided by the factor",
      "Chen et al. 2023 (arXiv:2306.15595)", (FACTOR,), aliases=("linear",), family="pi")
_freq("ntk", ntk, "NTK-aware: base b' = b·α^(d/(d−2)), high frequencies kept, low ones interpolated",
      "bloc97 2023, NTK-Aware Scaled RoPE (reddit r/LocalLLaMA)",
      (Param("factor", float, None, "used as alpha when alpha is not given", ge=1),
       Param("alpha", float, None, "base multiplier α (1 reproduces the model)", ge=1)),
      resolve=_ntk_resolve, family="ntk")
_freq("ntk-mixed", ntk_mixed, "Su's mixed-base NTK: θ'_i = θ_i·exp(−a(i+1)^β), a = ln(s)/(d/2)^β",
      "Su 2023, kexue.fm/archives/9706", (FACTOR, Param("beta", float, 0.75, "exponent of the mixed base", ge=0)),
      family="ntk")
_freq("dynamic-ntk", dynamic_ntk, "NTK base recomputed from the current length ℓ when ℓ > L",
      "emozilla 2023, Dynamically Scaled RoPE (reddit r/LocalLLaMA)", (FACTOR,), length_dependent=True, family="ntk")
_freq("ntk-by-parts", ntk_by_parts, "YaRN's per-dimension ramp between PI and no scaling, no temperature",
      "Peng et al. 2023, YaRN (arXiv:2309.00071)", (FACTOR, BETA_FAST, BETA_SLOW), family="yarn",
      validate=_check_betas)
_freq("yarn", yarn, "NTK-by-parts plus attention temperature: cos/sin × (0.1·ln s + 1)",
      "Peng et al. 2023, YaRN (arXiv:2309.00071)",
      (FACTOR, BETA_FAST, BETA_SLOW,
       Param("attention_factor", float, None, "cos/sin multiplier; default 0.1·ln(factor) + 1", gt=0)),
      resolve=_yarn_resolve, validate=_check_betas, family="yarn")
_freq("dynamic-yarn", dynamic_yarn, "YaRN with s = max(1, ℓ/L) recomputed from the current length",
      "Peng et al. 2023, YaRN (arXiv:2309.00071)", (BETA_FAST, BETA_SLOW), length_dependent=True,
      family="yarn", validate=_check_betas)
_freq("llama3", llama3, "Llama-3.1 wavelength bands: interpolate long wavelengths, keep short, blend between",
      "Meta 2024, The Llama 3 Herd of Models (arXiv:2407.21783)",
      (Param("factor", float, 8.0, "interpolation factor for the longest wavelengths", ge=1),
       Param("low_freq_factor", float, 1.0, "wavelengths above L/low_freq_factor are interpolated", gt=0),
       Param("high_freq_factor", float, 4.0, "wavelengths below L/high_freq_factor are kept", gt=0)),
      family="llama3", validate=_check_bands)
_freq("base", base, "replace rope_theta (ABF; 'base of RoPE bounds context length')",
      "Xiong et al. 2023 (arXiv:2309.16039); Men et al. 2024 (arXiv:2405.14591)",
      (Param("theta", float, None, "new rope_theta (a RoPE base is > 1)", required=True, gt=1),), family="base")
_freq("deepseek-yarn", deepseek_yarn, "YaRN as DeepSeek-V2/V3 apply it: temperature mscale(s, mscale_all_dim)² "
      "on the softmax scale, cos/sin × mscale(s, mscale)/mscale(s, mscale_all_dim)",
      "DeepSeek-AI 2024, DeepSeek-V2 (arXiv:2405.04434); Peng et al. 2023, YaRN (arXiv:2309.00071)",
      (FACTOR, BETA_FAST, BETA_SLOW,
       Param("mscale", float, 1.0, "temperature coefficient of the cos/sin part: 0.1·mscale·ln s + 1", gt=0),
       Param("mscale_all_dim", float, 1.0, "temperature coefficient of the softmax scale (all head dims)", gt=0)),
      validate=_check_betas, family="yarn", softmax=deepseek_softmax)
_freq("proportional", proportional, "partial RoPE as Gemma 4 uses it: the first fraction of pairs keep "
      "θ^(−2i/d)/s, the rest stop rotating", "transformers rope_type='proportional' (Gemma 4)",
      (Param("factor", float, 1.0, "interpolation factor of the rotating pairs", ge=1),
       Param("fraction", float, 1.0, "share of frequency pairs that rotate (partial_rotary_factor)", gt=0, le=1)),
      family="pi")
_freq("longrope", longrope, "LongRoPE: per-dimension factors, short ones up to L, long ones past it; cos/sin × "
      "√(1 + ln s / ln L)", "Ding et al. 2024, LongRoPE (arXiv:2402.13753)",
      (FACTOR,
       Param("short_factor", list[float], None, "per-pair factors up to L (default: the checkpoint's)", gt=0),
       Param("long_factor", list[float], None, "per-pair factors past L (default: the checkpoint's)", gt=0),
       Param("attention_factor", float, None, "cos/sin multiplier; default √(1 + ln s / ln L)", gt=0)),
      length_dependent=True, resolve=_longrope_resolve, validate=_check_longrope, family="longrope",
      complete=longrope_factors)
