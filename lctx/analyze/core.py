"""What a model's RoPE, and each variant of it, does at target lengths: computed from the config alone.

The model's base, rotary dimension and training length come from its config (no weights); every variant's
frequencies come from lctx's own implementation (:func:`lctx.patches.frequency.frequency_function`), resolved
per target length as ``lctx eval --target-len`` would (factor = target / training length where a spec gives
none). Attention-level variants keep the frequencies and change the relative positions instead, so they are
analysed through their position map. Everything is returned as one JSON-ready dict (see :func:`analyze`).

Conventions: a context of T tokens has relative distances 0 … T − 1, and a variant rotates the largest by the
relative position P (T − 1, or an attention variant's map of it); its *span* is P + 1, the length whose angles
it reaches (T for plain RoPE, L for PI at factor T/L). A dimension *rotates in training* when L·θ_i ≥ 2π, i.e.
its wavelength is at most L (Liu et al.'s critical dimension counts these); otherwise it is *out of
distribution* when span·θ'_i > L·θ_i. Men et al.'s bound and B(m) use m in [0, T], as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lctx import models, patches
from lctx import spec as grammar
from lctx.analyze import bound
from lctx.patches import RopeSpec, SpecError, format_value
from lctx.patches.arch import RopeInfo, UnsupportedModelError, default_inv_freq, training_length
from lctx.patches.frequency import frequency_function

SCHEMA = "lctx.analysis/1"
DEFAULT_LENGTHS = "8k,32k,128k"
DEFAULT_ROPES = "pi,ntk,yarn,rerope"
MAX_LENGTH = 1 << 20  # B(m) is checked at every m up to the length: 1m tokens is already a minute
POSITION_MAPS = ("rerope", "leaky-rerope", "self-extend")
_CURVE_POINTS = 160  # samples per curve in the JSON (figures are drawn from these)


class AnalyzeError(ValueError):
    """Options that do not describe one RoPE configuration: conflicting, missing or out-of-range values."""


USAGE_ERRORS = (AnalyzeError, SpecError, models.ModelLoadError, UnsupportedModelError)


@dataclass(frozen=True)
class Source:
    """The configuration analysed: where it came from and the :class:`RopeInfo` every variant reads."""

    name: str
    kind: str  # "gguf", "directory", "hub" or "what-if"
    info: RopeInfo
    rope_type: str


def rope_info_from_config(config: Any, train_len: int | None = None) -> tuple[RopeInfo, str]:
    """The :class:`RopeInfo` a loaded model would give, and its rope_type, without building the model.

    The model's own frequencies are what its rotary module computes at load (transformers' init function for
    the config's rope_type), so a checkpoint's own scaling (e.g. Llama 3.1's) is what ``none`` means here too.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    arch = getattr(config, "model_type", None) or type(config).__name__
    params = getattr(config, "rope_parameters", None)
    if not params:
        raise UnsupportedModelError(
            f"model type {arch!r} has no rotary position embedding in its config (no rope_parameters; e.g. GPT-2 "
            "uses learned absolute positions), so there is no RoPE to analyse"
        )
    if any(isinstance(value, dict) for value in params.values()):
        raise UnsupportedModelError(f"model type {arch!r} has one RoPE per layer type ({', '.join(params)}), "
                                    "which lctx does not analyse yet")
    theta = float(params["rope_theta"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        inv_freq, scaling = default_inv_freq(theta, rotary_dim), 1.0
    elif rope_type in ROPE_INIT_FUNCTIONS:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
    else:
        raise UnsupportedModelError(f"model type {arch!r}: unknown rope_type {rope_type!r}; known: default, "
                                    f"{', '.join(ROPE_INIT_FUNCTIONS)}")
    info = RopeInfo(arch=arch, theta=theta, rotary_dim=rotary_dim, head_dim=head_dim,
                    train_len=int(train_len) if train_len else training_length(config),
                    inv_freq=inv_freq.detach().float().cpu(), attention_scaling=float(scaling or 1.0))
    return info, rope_type


def _gguf_config(path: Path) -> Any:
    """lctx's converted copy of a GGUF when ``lctx eval`` made one, else the file's metadata: no dequantizing."""
    if not path.is_file():
        raise models.ModelLoadError(f"GGUF file {str(path)!r} not found")
    converted = models.gguf_cache(path)
    if (converted / "config.json").is_file():
        return AutoConfig.from_pretrained(converted)
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def load_source(ref: str, train_len: int | None = None) -> Source:
    """A model's RoPE from its config: an alias, a local directory, a .gguf file or a hub id."""
    path = Path(models.resolve_alias(ref)).expanduser()
    if path.suffix == ".gguf":
        config, kind = _gguf_config(path), "gguf"
    else:
        config, kind = models.load_config(ref, weights=False), "directory" if path.is_dir() else "hub"
    info, rope_type = rope_info_from_config(config, train_len)
    return Source(ref, kind, info, rope_type)


def what_if(theta: float, rotary_dim: int, train_len: int) -> Source:
    """A bare RoPE (θ_i = theta^(−2i/d)) for a what-if without a model."""
    if not theta > 1 or not math.isfinite(theta):
        raise AnalyzeError(f"--theta {theta:g}: a RoPE base must be a finite number > 1, e.g. 10000 or 5e5")
    if rotary_dim < 2 or rotary_dim % 2:
        raise AnalyzeError(f"--rotary-dim {rotary_dim}: the rotary dimension is an even number ≥ 2, e.g. 64 or 128")
    if train_len < 2:
        raise AnalyzeError(f"--train-len {train_len}: a training length is at least 2 tokens")
    info = RopeInfo(arch="what-if", theta=float(theta), rotary_dim=rotary_dim, head_dim=rotary_dim,
                    train_len=train_len, inv_freq=default_inv_freq(theta, rotary_dim), attention_scaling=1.0)
    return Source(f"theta={theta:g}, d={rotary_dim}, L={train_len}", "what-if", info, "default")


# ---- one variant at one length ------------------------------------------------------------------------------


def relative_position(spec: RopeSpec, distance: torch.Tensor) -> torch.Tensor:
    """The relative position attention rotates a query–key pair ``distance`` tokens apart by (float64).

    Frequency variants keep distances. Attention variants (lctx/patches/rerope.py) map the far part: ReRoPE
    caps it at the window w, Leaky ReRoPE grows it 1/k per token, SelfExtend groups it (⌊i/G⌋ + w − ⌊w/G⌋) −
    ⌊j/G⌋, written here for the key at position 0, where it is largest.
    """
    d = distance.to(torch.float64)
    if spec.variant.kind == "frequency":
        return d
    p = spec.kwargs
    w = p["window"]
    if spec.name == "rerope":
        far = torch.full_like(d, float(w))
    elif spec.name == "leaky-rerope":
        far = w + (d - w) / p["k"]
    elif spec.name == "self-extend":
        far = torch.floor(d / p["group"]) + (w - w // p["group"])
    else:
        raise AnalyzeError(f"variant {spec.name!r} patches attention with a position map lctx analyze does not "
                           f"know; analysed attention variants: {', '.join(POSITION_MAPS)}")
    return torch.where(d < w, d, far)


@dataclass(frozen=True)
class Applied:
    """A variant resolved for one target length: the frequencies and scale it installs."""

    label: str  # the spec as given (one colour per label in figures)
    spec: RopeSpec  # resolved
    length: int
    theta: torch.Tensor  # effective θ_i, float64 (from the float32 the model holds)
    attention_scaling: float


def apply_variant(source: Source, spec: RopeSpec, length: int, label: str | None = None) -> Applied:
    """Resolve ``spec`` for ``length`` and compute its frequencies as lctx installs them.

    Factors default to length / training length (1 at or below it); dynamic variants see ``length``.
    """
    info = source.info
    resolved = spec.resolve(info.train_len, max(length, info.train_len))
    fn = frequency_function(resolved.name) if resolved.variant.kind == "frequency" else None
    inv_freq, scaling = (info.inv_freq, info.attention_scaling) if fn is None else fn(info, resolved.kwargs, length)
    return Applied(label or str(spec), resolved, length, inv_freq.double(), float(scaling))


def effective_base(theta: torch.Tensor) -> float | None:
    """The base whose lowest frequency equals θ'_(d/2−1) (exact for base-changing variants: NTK, base)."""
    half = theta.numel()
    return None if half < 2 else float(theta[-1]) ** (-half / (half - 1))


def _b_curve(theta: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """B at each relative position: by matrix product when they are whole numbers, else directly."""
    if torch.equal(positions, positions.round()):
        top = int(positions.max())
        return bound.b_values(theta[None], 0, top)[0][positions.long()]
    return torch.cat([torch.cos(chunk[:, None] * theta).sum(1) for chunk in positions.split(1 << 16)])


def _samples(length: int) -> np.ndarray:
    """Distances a curve is reported at: every one up to 16, then log-spaced to ``length``."""
    dense = np.arange(min(length, 16) + 1)
    logs = np.round(np.geomspace(16, length, _CURVE_POINTS - 16)).astype(int) if length > 16 else dense
    return np.unique(np.concatenate([dense, logs]))


def _round(values, digits: int = 5) -> list:
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=float).tolist()]


def _curves(theta: torch.Tensor, spec: RopeSpec, length: int) -> tuple[dict[str, Any], float, int]:
    """Sampled curves of one configuration over distances 0 … ``length``, and min of B with where it is.

    ``b_running_min`` is min over m' ≤ m of B(m'); ``b_low``/``b_high`` the range of B between samples (the
    figures draw the band); ``decay`` is Su's bound.
    """
    distances = torch.arange(length + 1, dtype=torch.float64)
    values = _b_curve(theta, relative_position(spec, distances)).numpy()
    at = _samples(length)
    edges = np.append(at, length + 1)
    low = np.minimum.reduceat(values, edges[:-1])
    high = np.maximum.reduceat(values, edges[:-1])
    decay = bound.su_decay(theta, relative_position(spec, torch.as_tensor(at, dtype=torch.float64)))
    curves = {"distance": at.tolist(), "b_running_min": _round(np.minimum.accumulate(values)[at], 4),
              "b_low": _round(low, 4), "b_high": _round(high, 4), "decay": _round(decay.numpy(), 4)}
    argmin = int(values.argmin())
    return curves, float(values[argmin]), argmin


def _bound_check(base: float | None, b_min: float, b_min_at: int, bounds: bound.BaseBound) -> dict[str, Any]:
    return {"meets_lower_bound": None if base is None or bounds.lower is None else base >= bounds.lower,
            "meets_stable_bound": None if base is None or bounds.stable is None else base >= bounds.stable,
            "b_min": round(b_min, 6), "b_min_at": b_min_at, "admissible": b_min >= 0}


def _record(source: Source, applied: Applied, bounds: bound.BaseBound) -> dict[str, Any]:
    """Everything about one variant at one length (per-dimension arrays included)."""
    info, spec, length = source.info, applied.spec, applied.length
    trained = info.train_len * info.inv_freq.double()  # angle each dimension spans in training
    top = float(relative_position(spec, torch.tensor([length - 1.0]))[0])
    angle = (top + 1) * applied.theta
    ratio = angle / trained
    ood = (trained < 2 * math.pi) & (ratio > 1 + 1e-9)
    curves, b_min, b_min_at = _curves(applied.theta, spec, length)
    base = effective_base(applied.theta)
    params = spec.kwargs
    return {
        "label": applied.label, "resolved": spec.canonical, "name": spec.name, "kind": spec.variant.kind,
        "family": spec.variant.family, "length": length, "effective_base": base,
        "attention_scaling": applied.attention_scaling,
        "logn_scale": max(1.0, math.log(length) / math.log(info.train_len)) if params.get("logn") else 1.0,
        "max_position": top, "span": top + 1,
        "rotating_pairs": int((angle >= 2 * math.pi).sum()), "ood_pairs": int(ood.sum()),
        "max_ood_ratio": float(ratio[trained < 2 * math.pi].max()) if bool((trained < 2 * math.pi).any()) else None,
        **_bound_check(base, b_min, b_min_at, bounds),
        "decay_at_length": round(float(bound.su_decay(applied.theta, torch.tensor([top]))[0]), 6),
        "dims": {"theta": _round(applied.theta.numpy(), 8), "wavelength": _round(2 * math.pi / applied.theta.numpy()),
                 "ood_ratio": _round(ratio.numpy()), "ood": ood.tolist()},
        "curves": curves,
    }


# ---- what reaches a length --------------------------------------------------------------------------------


def _ceil(value: float, digits: int = 3) -> float:
    """``value`` rounded *up* to ``digits`` significant digits (a parameter that must reach a threshold)."""
    if value <= 0:
        return value
    scale = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return round(math.ceil(value / scale - 1e-9) * scale, 12)


def reach(info: RopeInfo, length: int, bounds: bound.BaseBound) -> dict[str, Any]:
    """Parameters that reach ``length``, with ready-to-run specs.

    ``factor`` = length / L for PI and YaRN (their definition); ``ntk_alpha`` the smallest NTK α leaving no
    dimension out of distribution (each non-rotating i needs α ≥ (T/L)^((d−2)/2i), largest at the first of
    them); ``ntk_alpha_for_bound`` and ``base_for_bound`` make the base b·α^(d/(d−2)) reach the stable bound.
    """
    d, big_l = info.rotary_dim, info.train_len
    factor = max(1.0, length / big_l)
    theta = default_inv_freq(info.theta, d).double()
    stretch = length / big_l
    needs = [stretch ** ((d - 2) / (2 * i)) for i in range(1, d // 2) if big_l * float(theta[i]) < 2 * math.pi]
    alpha = _ceil(max(needs)) if needs and stretch > 1 else 1.0
    target = bounds.stable
    out: dict[str, Any] = {"length": length, "factor": round(factor, 6), "ntk_alpha": alpha,
                           "ntk_alpha_for_bound": None, "base_for_bound": None}
    written = format_value(round(factor, 6))
    specs = {"pi": f"pi:factor={written}", "yarn": f"yarn:factor={written}", "ntk": f"ntk:alpha={format_value(alpha)}"}
    if target is not None and d > 2:
        out["ntk_alpha_for_bound"] = _ceil(max(1.0, (target / info.theta) ** ((d - 2) / d)))
        out["base_for_bound"] = info.theta if info.theta >= target else _ceil(target)
        specs["base"] = f"base:theta={format_value(out['base_for_bound'])}"
    out["specs"] = specs
    return out


# ---- the whole analysis -------------------------------------------------------------------------------------


def analyze(source: Source, lengths: list[int], ropes: list[tuple[str, RopeSpec]],
            ratio: float = bound.RATIO) -> dict[str, Any]:
    """The analysis of ``source`` at ``lengths`` for each (label, spec) in ``ropes``, as a JSON-ready dict.

    The model as trained is always included (``model``); a plain ``none`` spec is the model and is not repeated.
    Raises :class:`SpecError` for a spec that does not resolve, :class:`AnalyzeError` for an unknown position map.
    """
    with bound.one_thread():
        return _analyze(source, lengths, ropes, ratio)


def _analyze(source: Source, lengths: list[int], ropes: list[tuple[str, RopeSpec]], ratio: float) -> dict[str, Any]:
    info = source.info
    none = RopeSpec("none")
    model_rows, bounds_rows, reach_rows = [], [], []
    variants: dict[str, list[dict[str, Any]]] = {label: [] for label, spec in ropes if spec.canonical != "none"}
    specs = dict(ropes)
    for length in lengths:
        bounds = bound.base_bound(info.rotary_dim, length, ratio)
        model = _record(source, apply_variant(source, none, length, "model"), bounds)
        model.update({"label": "model", "base": info.theta,
                      **{k: v for k, v in _bound_check(info.theta, model["b_min"], model["b_min_at"], bounds).items()
                         if k.startswith("meets")}})
        model_rows.append(model)
        bounds_rows.append(bounds.as_dict())
        reach_rows.append(reach(info, length, bounds))
        for label in variants:
            variants[label].append(_record(source, apply_variant(source, specs[label], length, label), bounds))
    wavelength = 2 * math.pi / info.inv_freq.double()
    rotating = info.train_len * info.inv_freq.double() >= 2 * math.pi
    return {
        "schema": SCHEMA,
        "source": {"name": source.name, "kind": source.kind, "arch": info.arch, "rope_type": source.rope_type},
        "rope": {"theta": info.theta, "rotary_dim": info.rotary_dim, "head_dim": info.head_dim,
                 "train_len": info.train_len, "attention_scaling": info.attention_scaling},
        "lengths": list(lengths),
        "dimensions": {"theta": _round(info.inv_freq.double().numpy(), 8), "wavelength": _round(wavelength.numpy()),
                       "rotates_in_training": rotating.tolist(), "rotating_pairs": int(rotating.sum()),
                       "critical_dimension": 2 * int(rotating.sum())},
        "bounds": bounds_rows,
        "model": model_rows,
        "reach": reach_rows,
        "variants": [{"label": label, "at": rows} for label, rows in variants.items()],
        "conventions": CONVENTIONS,
    }


CONVENTIONS = {
    "B(m)": "Σ_i cos(m·θ_i), i < d/2: Men et al. 2024 (arXiv:2405.14591); a base is admissible for length T when "
            "B(m) ≥ 0 for every integer m in [0, T]",
    "base_lower_bound": "smallest admissible base on the grid ratio^k (scan_ratio); admissible windows lie above it",
    "base_lower_bound_stable": "smallest base from which every grid base is admissible (scanned up to "
                               "certified_from, proved for every base beyond)",
    "critical_dimension": "2 × the number of pairs whose wavelength 2π/θ_i is at most the training length L "
                          "(Liu et al. 2023, arXiv:2310.05209)",
    "max_position": "largest relative position the variant rotates by at the length (T−1, or the attention "
                    "variant's map of it); span = max_position + 1",
    "ood_ratio": "per pair: span·θ'_i / (L·θ_i); out of distribution when > 1 for a pair whose wavelength exceeds L",
    "rotating_pairs": "pairs whose angle over the span reaches 2π (a full rotation within the context)",
    "effective_base": "base whose lowest frequency equals the variant's: θ'_(d/2−1)^(−d/(d−2))",
    "decay": "Su et al. 2021 (RoFormer §3.4.3) long-term decay bound (1/(d/2))·Σ_j |Σ_(i<j) e^(i·m·θ_i)| at the "
             "relative position m each distance maps to",
    "ntk_alpha": "smallest NTK α leaving no pair out of distribution at the length",
    "b_min": "min of B over the relative positions used up to the length; admissible when ≥ 0",
    "meets_lower_bound": "the base (the model: its config's rope_theta; a variant: its effective base) is at least "
                         "base_lower_bound; meets_stable_bound likewise for base_lower_bound_stable",
}


# ---- command-line options ---------------------------------------------------------------------------------


def _number(flag: str, text: str, kind: type) -> Any:
    try:
        return kind(float(text)) if kind is float else kind(text)
    except ValueError:
        example = "10000 or 5e5" if kind is float else "64 or 128"
        raise AnalyzeError(f"{flag} {text!r} is not a{'n integer' if kind is int else ' number'}, e.g. {example}"
                           ) from None


def from_options(model: str | None = None, lengths: str = DEFAULT_LENGTHS, ropes: str | list[str] = DEFAULT_ROPES,
                 theta: str | None = None, rotary_dim: str | None = None, train_len: str | None = None) -> dict:
    """The analysis the command line asks for: a model's config (default the lctx default model) or a bare
    what-if (``theta``, ``rotary_dim`` and ``train_len``, no model); ``train_len`` also overrides a model's.
    """
    try:
        targets = grammar.parse_lengths(lengths)
        train = grammar.parse_length(train_len) if train_len is not None else None
    except ValueError as err:
        raise AnalyzeError(str(err)) from None
    too_long = [n for n in targets if n > MAX_LENGTH]
    if too_long:
        raise AnalyzeError(f"--lengths: {too_long[0]} tokens is over the {MAX_LENGTH} (1m) lctx analyze checks "
                           "(B(m) is evaluated at every m up to the length)")
    specs: dict[RopeSpec, str] = {}
    for text in grammar.split_list(ropes):
        specs.setdefault(patches.parse(text), text)
    labelled = [(text, spec) for spec, text in specs.items()]
    bare = {"--theta": theta, "--rotary-dim": rotary_dim}
    if model is not None and any(v is not None for v in bare.values()):
        given = ", ".join(flag for flag, v in bare.items() if v is not None)
        raise AnalyzeError(f"--model {model!r} conflicts with {given}: analyse a model's config (--model, optionally "
                           "--train-len) or a bare what-if (--theta, --rotary-dim, --train-len), not both")
    if any(v is not None for v in bare.values()):
        missing = [flag for flag, v in {**bare, "--train-len": train_len}.items() if v is None]
        if missing:
            raise AnalyzeError(f"a what-if without a model needs --theta, --rotary-dim and --train-len; missing: "
                               f"{', '.join(missing)}")
        source = what_if(_number("--theta", theta, float), _number("--rotary-dim", rotary_dim, int), train)
    else:
        source = load_source(model or models.DEFAULT_MODEL, train)
    return analyze(source, targets, labelled)
