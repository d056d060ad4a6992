"""RoPE variants behind one registry and one spec grammar.

A spec is ``name[:key=value]*`` (e.g. ``yarn:factor=4:beta_fast=32``). Parameters are separated by colons so
that specs fit in comma-separated lists (``--rope none,ntk:factor=4``) and in lm-eval's ``--model_args``.
:func:`parse` checks a spec against the registry; :meth:`RopeSpec.resolve` fills the defaults that depend on
the model (training length, target length); :func:`apply` patches a model in place, reversibly.

A variant is added by writing one module that calls :func:`register`, and importing it at the bottom of
this file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lctx.patches.arch import SUPPORTED_ARCHITECTURES, RopeInfo, UnsupportedModelError, rope_info

GRAMMAR = "name[:key=value]*  e.g. yarn:factor=4:beta_fast=32 (several specs: comma-separated)"


class SpecError(ValueError):
    """A RoPE spec that does not parse, names an unknown variant, or has bad parameters."""


@dataclass(frozen=True)
class Param:
    """One parameter of a variant. ``default=None`` with ``required=True`` means the user must give it."""

    name: str
    type: type
    default: Any = None
    help: str = ""
    required: bool = False

    def convert(self, variant: str, raw: str) -> Any:
        try:
            if self.type is bool:
                low = raw.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                return low in ("true", "1", "yes")
            value = self.type(raw)
            if self.type is float and not math.isfinite(value):
                raise ValueError(raw)
            return value
        except ValueError:
            raise SpecError(
                f"{variant}: parameter {self.name}={raw!r} is not a valid {self.type.__name__}. "
                f"Grammar: {GRAMMAR}"
            ) from None


# logn is a modifier every variant accepts (Su's log-n attention scaling).
LOGN = Param("logn", bool, False, "scale the query at position n by max(1, ln n / ln L)")


@dataclass(frozen=True)
class Variant:
    """A registered RoPE variant.

    ``patch(model, info, params, seq_len)`` returns a context manager that installs the variant in place and
    undoes it on exit; ``params`` is complete (defaults resolved). ``length_dependent`` marks variants whose
    output at position p depends on the total sequence length (dynamic scaling): evaluation must run each
    length separately for them. ``resolve`` fills parameters whose default depends on the model.
    """

    name: str
    description: str
    reference: str
    params: tuple[Param, ...]
    patch: Callable[[nn.Module, RopeInfo, Mapping[str, Any], int | None], contextlib.AbstractContextManager]
    kind: str = "frequency"
    length_dependent: bool = False
    aliases: tuple[str, ...] = ()
    resolve: Callable[[dict[str, Any], int], None] | None = None
    validate: Callable[[dict[str, Any]], None] | None = None

    @property
    def all_params(self) -> tuple[Param, ...]:
        return (*self.params, LOGN)


REGISTRY: dict[str, Variant] = {}
_ALIASES: dict[str, str] = {}


def register(variant: Variant) -> Variant:
    """Add a variant (and its aliases) to the registry."""
    for name in (variant.name, *variant.aliases):
        if name in REGISTRY or name in _ALIASES:
            raise ValueError(f"RoPE variant {name!r} is registered twice")
    REGISTRY[variant.name] = variant
    for alias in variant.aliases:
        _ALIASES[alias] = variant.name
    return variant


def variant_names() -> list[str]:
    return sorted(REGISTRY)


@dataclass(frozen=True)
class RopeSpec:
    """A parsed spec: variant name plus the parameters given (or, once resolved, all of them)."""

    name: str
    params: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    resolved: bool = False

    @property
    def variant(self) -> Variant:
        return REGISTRY[self.name]

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def length_dependent(self) -> bool:
        return self.variant.length_dependent

    def resolve(self, train_len: int, target_len: int | None = None) -> RopeSpec:
        """Fill every parameter: model-dependent defaults (window = L/4, factor = target/L), then the rest.

        Missing required parameters are an error here, with the grammar and the variant's parameters.
        """
        variant = self.variant
        values = self.kwargs
        names = {p.name for p in variant.params}
        if target_len is not None and "factor" in names and values.get("factor") is None:
            if "alpha" not in values:
                values["factor"] = target_len / train_len
        if variant.resolve is not None:
            variant.resolve(values, train_len)
        for p in variant.all_params:
            if values.get(p.name) is None:
                if p.required:
                    raise SpecError(
                        f"{variant.name}: missing required parameter {p.name!r}"
                        + (" (or pass --target-len to derive factor = target / training length)"
                           if p.name == "factor" else "")
                        + f". Parameters: {_describe_params(variant)}. Grammar: {GRAMMAR}"
                    )
                values[p.name] = p.default
        if variant.validate is not None:
            variant.validate(values)
        ordered = tuple((p.name, values[p.name]) for p in variant.all_params if values[p.name] is not None)
        return RopeSpec(self.name, ordered, resolved=True)

    @property
    def canonical(self) -> str:
        """``name:key=value:...`` with every parameter in registry order; identifies a variant's results."""
        return ":".join([self.name, *(f"{k}={format_value(v)}" for k, v in self.params)])

    def __str__(self) -> str:
        return self.canonical


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _describe_params(variant: Variant) -> str:
    parts = []
    for p in variant.all_params:
        default = "required" if p.required else ("auto" if p.default is None else format_value(p.default))
        parts.append(f"{p.name} ({p.type.__name__}, {default})")
    return ", ".join(parts)


def parse(text: str) -> RopeSpec:
    """Parse one spec string. Raises :class:`SpecError` naming the bad part and the valid choices."""
    text = text.strip()
    if not text:
        raise SpecError(f"empty RoPE spec. Grammar: {GRAMMAR}. Variants: {', '.join(variant_names())}")
    if "," in text:
        raise SpecError(f"{text!r} holds several specs; pass them to parse_list. Grammar: {GRAMMAR}")
    name, *parts = text.split(":")
    name = _ALIASES.get(name.strip(), name.strip())
    if name not in REGISTRY:
        raise SpecError(
            f"unknown RoPE variant {name!r}. Valid variants: {', '.join(variant_names())}. Grammar: {GRAMMAR}"
        )
    variant = REGISTRY[name]
    known = {p.name: p for p in variant.all_params}
    values: dict[str, Any] = {}
    for part in parts:
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise SpecError(f"{text!r}: {part!r} is not key=value. Grammar: {GRAMMAR}")
        if key not in known:
            raise SpecError(
                f"{name}: unknown parameter {key!r}. Parameters: {_describe_params(variant)}. Grammar: {GRAMMAR}"
            )
        if key in values:
            raise SpecError(f"{name}: parameter {key!r} given twice in {text!r}")
        values[key] = known[key].convert(name, raw.strip())
    return RopeSpec(name, tuple((p.name, values[p.name]) for p in variant.all_params if p.name in values))


def parse_list(values: str | list[str]) -> list[RopeSpec]:
    """Parse comma-separated specs (a string or repeated option values), keeping order, dropping repeats."""
    items = [values] if isinstance(values, str) else list(values)
    specs: list[RopeSpec] = []
    for item in items:
        for text in item.split(","):
            spec = parse(text)
            if spec not in specs:
                specs.append(spec)
    return specs


@contextlib.contextmanager
def apply(
    model: nn.Module,
    spec: RopeSpec | str,
    train_len: int | None = None,
    *,
    target_len: int | None = None,
    seq_len: int | None = None,
) -> Iterator[RopeSpec]:
    """Patch ``model`` in place with ``spec`` for the duration of the block; yields the resolved spec.

    ``train_len`` defaults to the model's training length (see :func:`lctx.patches.arch.rope_info`).
    ``seq_len`` freezes the length that length-dependent variants scale for (generation: prompt plus new
    tokens, so cached keys and new queries share one base); by default each forward uses its own length.
    """
    if isinstance(spec, str):
        spec = parse(spec)
    info = rope_info(model, train_len)
    if spec.variant.kind == "attention" and info.arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"variant {spec.name!r} patches attention and supports the architectures "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}; the model is {info.arch!r}"
        )
    resolved = spec if spec.resolved else spec.resolve(info.train_len, target_len)
    with resolved.variant.patch(model, info, resolved.kwargs, seq_len):
        yield resolved


# Importing the variant modules registers them.
from lctx.patches import frequency, rerope  # noqa: E402, F401
