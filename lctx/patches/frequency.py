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
from lctx.patches.arch import RopeInfo, default_inv_freq, override_rotary
from lctx.patches.logn import logn_attention

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


def ntk(info: RopeInfo, p: Mapping[str, Any], length: int) -> Frequencies:
    d = info.rotary_dim
    return default_inv_freq(info.theta * p["alpha"] ** (d / (d - 2)), d), 1.0


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
    return default_inv_freq(info.theta * ((s * length / big_l) - (s - 1)) ** (d / (d - 2)), d), 1.0


def _ramp_between(info: RopeInfo, factor: float, beta_fast: float, beta_slow: float) -> torch.Tensor:
    """YaRN's NTK-by-parts: per dimension, interpolate by ``factor`` (low frequencies) or keep (high)."""
    d, base = info.rotary_dim, info.theta

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
    wavelen = 2 * math.pi / freq
    low_wavelen, high_wavelen = info.train_len / low, info.train_len / high
    smooth = (info.train_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * freq / factor + smooth * freq
    out = torch.where(wavelen > low_wavelen, freq / factor, freq)
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(middle, blended, out), 1.0


def base(info: RopeInfo, p: Mapping[str, Any], length: int) -> Frequencies:
    return default_inv_freq(p["theta"], info.rotary_dim), 1.0


def _patcher(fn: Callable[[RopeInfo, Mapping[str, Any], int], Frequencies] | None, length_dependent: bool):
    @contextlib.contextmanager
    def patch(model: nn.Module, info: RopeInfo, params: Mapping[str, Any], seq_len: int | None) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if fn is not None:
                stack.enter_context(override_rotary(
                    model, lambda length: fn(info, params, length), seq_len, length_dependent))
            if params["logn"]:
                stack.enter_context(logn_attention(model, info.train_len))
            yield

    return patch


def _ntk_resolve(values: dict[str, Any], train_len: int) -> None:
    if values.get("alpha") is None:
        values["alpha"] = values.get("factor")
    if values.get("alpha") is None:
        raise SpecError("ntk: give alpha=… or factor=… (or --target-len). Grammar: ntk:alpha=4 or ntk:factor=4")
    values["factor"] = None  # folded into alpha, so ntk:factor=4 and ntk:alpha=4 share results


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
          length_dependent: bool = False, aliases: tuple[str, ...] = (), resolve=None, validate=None) -> None:
    _FUNCTIONS[name] = fn
    register(Variant(
        name=name, description=description, reference=reference, params=params,
        patch=_patcher(fn, length_dependent), kind="frequency", family=family, length_dependent=length_dependent,
        aliases=aliases, resolve=resolve, validate=validate,
    ))


# Hues from the Okabe–Ito and Tol colour-blind-safe palettes; the model as trained is black.
for _family in (
    Family("none", "#000000", ("o",), "the model as trained"),
    Family("pi", "#0072B2", ("s",), "position interpolation: every frequency scaled alike"),
    Family("ntk", "#E69F00", ("^", "v", "<"), "NTK-aware: a larger base, dynamic or mixed"),
    Family("yarn", "#009E73", ("D", ">", "d"), "NTK-by-parts: per-dimension ramp (YaRN)"),
    Family("llama3", "#882255", ("P",), "Llama-3.1 wavelength bands"),
    Family("base", "#44AA99", ("X",), "a new rope_theta"),
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
