"""One grammar for everything a user names: RoPE variants, tasks and run options, with typed parameters.

A spec is ``name[:key=value]*``: ``yarn:factor=4``, ``ppl:stride=512:last_k=256``,
``synthetic:niah-multikey:keys=4:haystack=noise``. The name is every leading part without ``=`` (so task
families read ``family:member``), the rest are parameters. Parameters are separated by colons so that specs fit
in comma-separated lists (``--rope none,ntk:factor=4``) and in lm-eval's ``--model_args``; list values are
bracketed (``depths=[0,0.5,1]``: commas inside brackets do not split specs) and text values that hold a
separator are double-quoted (``needle="Note: {value}"``).

Every parameter is declared once as a :class:`Param` (type, default, bounds, help) where its variant or task is
defined; the command line, experiment files and lm-eval's ``--model_args`` all convert and check values through
it, so a value is rejected the same way wherever it comes from.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

GRAMMAR = ("name[:key=value]*  e.g. yarn:factor=4 or synthetic:niah-multikey:keys=4 (several: comma-separated; "
           "lists in brackets: depths=[0,0.5,1])")


class SpecError(ValueError):
    """A spec that does not parse, names something unknown, or has a bad parameter value."""


# ---- lengths -----------------------------------------------------------------------------------------------

_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kKmM]?)\s*$")
LENGTH_FORMS = "an integer number of tokens (4096) or a number with a k or m suffix (×1024, ×1048576): 1k, 1.5k, 12k"


class Tokens(int):
    """A parameter type: a number of tokens, written ``4096``, ``4k`` (4096), ``1.5k`` (1536) or ``1m``."""


def parse_length(text: str | int, minimum: int = 2) -> int:
    """``4096``, ``4k`` (4096), ``1.5k`` (1536), ``1m`` (1048576); at least ``minimum`` tokens."""
    if isinstance(text, bool):
        raise ValueError(f"invalid length {text!r}: use {LENGTH_FORMS}")
    if isinstance(text, int):
        value = text
    else:
        match = _LENGTH.match(str(text))
        if not match:
            raise ValueError(f"invalid length {text!r}: use {LENGTH_FORMS}")
        number, suffix = float(match.group(1)), match.group(2).lower()
        scaled = number * {"": 1, "k": 1024, "m": 1024 * 1024}[suffix]
        if scaled != int(scaled):
            raise ValueError(f"invalid length {text!r}: {scaled:g} is not a whole number of tokens; use {LENGTH_FORMS}")
        value = int(scaled)
    if value < minimum:
        raise ValueError(f"invalid length {text!r}: a length must be at least {minimum} tokens")
    return value


def parse_lengths(values: str | Iterable[str | int]) -> list[int]:
    """Comma-separated and/or repeated lengths, sorted, without repeats."""
    items = [values] if isinstance(values, str | int) else list(values)
    lengths = [parse_length(part) for item in items
               for part in ([item] if isinstance(item, int) else str(item).split(",")) if str(part).strip()]
    if not lengths:
        raise ValueError(f"no length given: use {LENGTH_FORMS}")
    return sorted(set(lengths))


def format_length(n: int) -> str:
    """4096 → ``4k``, 1536 → ``1.5k``, 1000 → ``1000``."""
    if n % 1024 == 0:
        return f"{n // 1024}k"
    if n % 512 == 0:
        return f"{n / 1024:g}k"
    return str(n)


# ---- values ------------------------------------------------------------------------------------------------

_SPECIAL = re.compile(r'[:,\[\]"=]|^\s|\s$')


def format_value(value: Any) -> str:
    """A value as the grammar writes it (canonical forms and help texts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, str) and (not value or _SPECIAL.search(value)):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return f"list of {type_name(typing.get_args(kind)[0])}"
    return {Tokens: "length", bool: "bool", int: "int", float: "float", str: "text"}.get(kind, str(kind))


@dataclass(frozen=True)
class Param:
    """One parameter of a variant, a task or a run: its type, default, bounds and help, declared once.

    ``default=None`` with ``required=True`` means the user must give it; ``None`` without ``required`` means
    "decided later" (e.g. from the model's training length). ``ge``/``gt``/``le``/``lt`` bound numbers (and
    each item of a list); ``choices`` restricts text. ``identity=False`` marks parameters that do not change a
    result (e.g. which depths a grid has: each cell records its own), so they are left out of its identity.
    """

    name: str
    type: Any
    default: Any = None
    help: str = ""
    required: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    identity: bool = True

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.type) is list

    @property
    def item_type(self) -> Any:
        return typing.get_args(self.type)[0] if self.is_list else self.type

    def bounds(self) -> str:
        """The allowed values in words: ``≥ 1``, ``> 0 and ≤ 1``, ``one of corpus, noise``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        parts = [f"{sign} {format_value(float(v)) if isinstance(v, float) else v}" for sign, v in
                 (("≥", self.ge), (">", self.gt), ("≤", self.le), ("<", self.lt)) if v is not None]
        return " and ".join(parts)

    def describe(self) -> str:
        """``factor (float > 0, required)``: for help texts and error messages."""
        default = ("required" if self.required else "auto" if self.default is None
                   else f"default {format_value(self.default)}")
        bounds = self.bounds()
        return f"{self.name} ({type_name(self.type)}{' ' + bounds if bounds else ''}, {default})"

    def convert(self, raw: Any, owner: str) -> Any:
        """A value from the grammar (a string) or from an experiment file (a TOML value), converted and checked.

        Raises SpecError naming ``owner`` (the variant or task), the parameter, the value and what is valid.
        """
        if self.is_list:
            items = _list_items(raw) if isinstance(raw, str) else raw
            if not isinstance(items, list | tuple):
                raise self._error(owner, raw)
            value: Any = [self._scalar(item, owner, raw) for item in items]
            if not value:
                raise SpecError(f"{owner}: parameter {self.name} is an empty list; give at least one value. "
                                f"{self.describe()}")
        else:
            value = self._scalar(raw, owner, raw)
        return value

    def _scalar(self, raw: Any, owner: str, whole: Any) -> Any:
        kind = self.item_type
        try:
            if kind is bool:
                if isinstance(raw, bool):
                    value = raw
                elif not isinstance(raw, str):  # an experiment file's 1 is not a yes
                    raise ValueError(raw)
                else:
                    low = raw.strip().lower()
                    if low not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(raw)
                    value = low in ("true", "1", "yes")
            elif kind is Tokens:
                value = parse_length(raw, minimum=-(2**62))
            elif kind is int:
                if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                    raise ValueError(raw)
                value = int(raw) if not isinstance(raw, str) else int(raw.strip())
            elif kind is float:
                if isinstance(raw, bool):
                    raise ValueError(raw)
                value = float(raw)
                if not math.isfinite(value):
                    raise ValueError(raw)
            elif kind is str:
                if not isinstance(raw, str):
                    raise ValueError(raw)
                value = raw
            else:
                raise ValueError(raw)
        except (TypeError, ValueError):
            raise self._error(owner, whole) from None
        self._check(value, owner, whole)
        return value

    def _check(self, value: Any, owner: str, whole: Any) -> None:
        if self.choices is not None and value not in self.choices:
            raise self._error(owner, whole)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        if not ok:
            raise self._error(owner, whole)

    def _error(self, owner: str, raw: Any) -> SpecError:
        shown = raw if isinstance(raw, str) else format_value(raw) if isinstance(raw, bool | int | float | list) \
            else repr(raw)
        return SpecError(f"{owner}: {self.name}={shown} is not valid: {self.describe()}")


def _list_items(text: str) -> list[str]:
    """``[0,0.5,1]`` or a single ``0.5`` → the items as strings."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [part.strip() for part in split_top(inner, ",")] if inner else []
    return [text]


# ---- parsing -----------------------------------------------------------------------------------------------


def split_top(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside brackets and double quotes (backslash escapes inside quotes)."""
    parts, current, depth, quoted, escaped = [], [], 0, False, False
    for ch in text:
        if quoted:
            current.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        elif ch == separator and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quoted:
        raise SpecError(f"unterminated quote in {text!r}. Grammar: {GRAMMAR}")
    parts.append("".join(current))
    return parts


def _unquote(raw: str) -> str:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return re.sub(r"\\(.)", r"\1", raw[1:-1])
    return raw


def split_list(values: str | Sequence[str]) -> list[str]:
    """Comma-separated and/or repeated specs as one list of spec strings (commas in brackets/quotes kept)."""
    items = [values] if isinstance(values, str) else list(values)
    return [part.strip() for item in items for part in split_top(item, ",")]


@dataclass(frozen=True)
class Parsed:
    """A spec split into its name and its ``key=value`` parameters (values still raw strings)."""

    text: str
    name: str
    params: tuple[tuple[str, str], ...]


def parse(text: str) -> Parsed:
    """Split one spec into name and raw parameters; SpecError for empty names, parts that are not key=value,
    and keys given twice. Whether the name and keys exist is for the registry to say."""
    text = text.strip()
    if not text:
        raise SpecError(f"empty spec. Grammar: {GRAMMAR}")
    parts = split_top(text, ":")
    names: list[str] = []
    params: list[tuple[str, str]] = []
    for part in parts:
        key, sep, raw = part.partition("=")
        if not sep:
            if params:
                raise SpecError(f"{text!r}: {part!r} is not key=value (parameters come after the name). "
                                f"Grammar: {GRAMMAR}")
            if not part.strip():
                raise SpecError(f"{text!r}: empty name part. Grammar: {GRAMMAR}")
            names.append(part.strip())
            continue
        key = key.strip()
        if not key or not raw.strip():
            raise SpecError(f"{text!r}: {part!r} is not key=value. Grammar: {GRAMMAR}")
        if any(k == key for k, _ in params):
            raise SpecError(f"{text!r}: parameter {key!r} given twice")
        params.append((key, _unquote(raw) if raw.strip().startswith('"') else raw.strip()))
    if not names:
        raise SpecError(f"{text!r} has no name before its parameters. Grammar: {GRAMMAR}")
    return Parsed(text, ":".join(names), tuple(params))


def describe_params(params: Iterable[Param]) -> str:
    return ", ".join(p.describe() for p in params)


def convert_all(owner: str, declared: Sequence[Param], given: Iterable[tuple[str, Any]],
                grammar: str = GRAMMAR) -> dict[str, Any]:
    """Given ``(key, raw)`` pairs checked against ``declared``: unknown keys are SpecErrors naming the valid ones."""
    known = {p.name: p for p in declared}
    values: dict[str, Any] = {}
    for key, raw in given:
        if key not in known:
            raise SpecError(f"{owner}: unknown parameter {key!r}. Parameters: {describe_params(declared)}. "
                            f"Grammar: {grammar}")
        values[key] = known[key].convert(raw, owner)
    return values


def canonical(name: str, params: Iterable[tuple[str, Any]]) -> str:
    """``name:key=value:…`` with values in the grammar's form."""
    return ":".join([name, *(f"{k}={format_value(v)}" for k, v in params)])
