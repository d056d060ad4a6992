"""RoPE variants behind one registry and one spec grammar.

A spec is ``name[:key=value]*`` (e.g. ``yarn:factor=4:beta_fast=32``). Parameters are separated by colons so
that specs fit in comma-separated lists (``--rope none,ntk:factor=4``) and in lm-eval's ``--model_args``.
:func:`parse` checks a spec against the registry; :meth:`RopeSpec.resolve` fills the defaults that depend on
the model (training length, target length); :func:`apply` patches a model in place, reversibly.

A variant is added by writing one module that calls :func:`register` (with its :class:`Family`, declared once
next to it: figures take the variant's colour and marker from it), and importing it at the bottom of this file.
Parameters are :class:`lctx.spec.Param` declarations with their bounds, checked wherever a spec comes from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lctx import spec as grammar
from lctx.patches.arch import LAYERS as LAYER_CHOICES
from lctx.patches.arch import RopeInfo, UnsupportedModelError, rope_info
from lctx.spec import Param, SpecError, format_value

GRAMMAR = "name[:key=value]*  e.g. yarn:factor=4:beta_fast=32 (several specs: comma-separated)"


# Modifiers every variant accepts. ``layers`` picks the layers a variant changes on models whose layers differ
# (sliding-window and full attention, RoPE per layer type). Its default, None, means "the model's own
# convention" (see lctx.patches.arch.select) and is left out of the canonical spec, so the specs recorded before
# it existed keep their identity; only an explicit choice is printed. logn is Su's log-n attention scaling.
LAYERS = Param("layers", str, None, "layers to change: all, full (full attention) or sliding (sliding window); "
               "default: the full-attention layers where RoPE differs per layer type, else all",
               choices=LAYER_CHOICES)
LOGN = Param("logn", bool, False, "scale the query at position n by max(1, ln n / ln L)")
__all__ = ["GRAMMAR", "LAYERS", "LOGN", "Family", "Param", "RopeSpec", "SpecError", "UnsupportedModelError",
           "Variant", "apply", "check", "format_value", "parse", "parse_list", "register", "register_family",
           "variant_names"]


@dataclass(frozen=True)
class Family:
    """Related variants (e.g. ntk, ntk-mixed, dynamic-ntk): figures draw them in shades of one hue.

    Declared once, next to the variants that belong to it; a variant's marker is the family's marker at the
    variant's place among the family's members (registration order), so every report styles it the same way.
    """

    name: str
    color: str  # hex hue; members get lighter and darker shades of it
    markers: tuple[str, ...]  # matplotlib markers, one per member in registration order (cycled)
    description: str = ""


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
    family: str = ""  # a registered Family's name
    length_dependent: bool = False
    aliases: tuple[str, ...] = ()
    resolve: Callable[[dict[str, Any], int], None] | None = None
    validate: Callable[[dict[str, Any]], None] | None = None

    @property
    def all_params(self) -> tuple[Param, ...]:
        return (*self.params, LAYERS, LOGN)


REGISTRY: dict[str, Variant] = {}
FAMILIES: dict[str, Family] = {}
_ALIASES: dict[str, str] = {}


def register_family(family: Family) -> Family:
    """Declare a family of variants (its hue and markers) before registering its members."""
    if family.name in FAMILIES:
        raise ValueError(f"RoPE variant family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


def family_members(family: str) -> list[str]:
    """The variants of a family, in registration order."""
    return [name for name, variant in REGISTRY.items() if variant.family == family]


def register(variant: Variant) -> Variant:
    """Add a variant (and its aliases) to the registry; its family must be registered first."""
    if variant.family not in FAMILIES:
        raise ValueError(f"RoPE variant {variant.name!r}: family {variant.family!r} is not registered "
                         f"(register_family first); families: {', '.join(FAMILIES)}")
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
        return grammar.canonical(self.name, self.params)

    @property
    def family(self) -> Family:
        return FAMILIES[self.variant.family]

    def __str__(self) -> str:
        return self.canonical


def _describe_params(variant: Variant) -> str:
    return grammar.describe_params(variant.all_params)


def parse(text: str) -> RopeSpec:
    """Parse one spec string. Raises :class:`SpecError` naming the bad part and the valid choices."""
    text = text.strip()
    if not text:
        raise SpecError(f"empty RoPE spec. Grammar: {GRAMMAR}. Variants: {', '.join(variant_names())}")
    if len(grammar.split_list(text)) > 1:
        raise SpecError(f"{text!r} holds several specs; pass them to parse_list. Grammar: {GRAMMAR}")
    parsed = grammar.parse(text)
    head, _, rest = parsed.name.partition(":")
    if rest and _ALIASES.get(head, head) in REGISTRY:
        raise SpecError(f"{text!r}: {rest.split(':')[0]!r} is not key=value. Grammar: {GRAMMAR}")
    name = _ALIASES.get(parsed.name, parsed.name)
    if name not in REGISTRY:
        raise SpecError(
            f"unknown RoPE variant {name!r}. Valid variants: {', '.join(variant_names())}. Grammar: {GRAMMAR}"
        )
    variant = REGISTRY[name]
    values = grammar.convert_all(name, variant.all_params, parsed.params, GRAMMAR)
    return RopeSpec(name, tuple((p.name, values[p.name]) for p in variant.all_params if p.name in values))


def parse_list(values: str | list[str]) -> list[RopeSpec]:
    """Parse comma-separated specs (a string or repeated option values), keeping order, dropping repeats."""
    specs: list[RopeSpec] = []
    for text in grammar.split_list(values):
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
    resolved = spec if spec.resolved else spec.resolve(info.train_len, target_len)
    with resolved.variant.patch(model, info, resolved.kwargs, seq_len):
        yield resolved


# Importing the variant modules registers them.
from lctx.patches import frequency, rerope  # noqa: E402, F401
from lctx.patches.upfront import check  # noqa: E402
