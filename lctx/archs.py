"""``lctx archs``: which causal-LM model types of the installed transformers lctx patches, from a live matrix.

Every causal-LM model type transformers registers is built as a tiny random model from its own config class
(:mod:`lctx.patches.tiny`); those holding a rotary embedding are the rows, each run through the checks of
:mod:`lctx.matrix` (frequency parity against transformers, attention variants against the naive reference, the
LM head) after :func:`lctx.patches.check` has had its say. tests/test_archs.py runs the same functions and
asserts on what they measure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lctx.matrix import (
    ATTENTION_SPECS,
    Row,
    build,
    check_attention,
    check_frequencies,
    check_head,
    ids,
    logits,
    matrix_config,
    quiet,
    refusal,
)
from lctx.patches.arch import UnsupportedModelError, is_local, rotaries, text_config
from lctx.patches.layout import probe


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def layout_notes(model) -> list[str]:
    """What is special about the model's RoPE: per-layer-type, NoPE layers, partial, interleaved, MLA, MoE."""
    notes = []
    found = rotaries(model)
    if any(r.layer_type is not None for r in found):
        notes.append("per-layer-type RoPE (" + ", ".join(sorted({r.layer_type for r in found if r.layer_type})) + ")")
    config = text_config(model)
    if any(isinstance(t, str) and is_local(t) for t in getattr(config, "layer_types", None) or ()):
        notes.append("sliding-window layers")
    try:
        layouts = probe(model)
    except UnsupportedModelError:
        return notes
    if any(v is None for v in layouts.values()):
        notes.append(f"NoPE layers ({sum(v is None for v in layouts.values())} of {len(layouts)})")
    used = [v for v in layouts.values() if v is not None]
    if any(v.interleaved for v in used):
        notes.append("interleaved pairs")
    if any(v.offset > 0 for v in used):
        notes.append("MLA (RoPE on the last qk_rope_head_dim dims)")
    elif any(2 * v.pairs < v.head_dim for v in used):
        notes.append("partial rotary")
    if any(getattr(config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        notes.append("MoE")
    return notes


def check_type(model_type: str, parts: Iterable[str] = ("frequency", "attention", "head")) -> Row:
    """Build the tiny model of ``model_type`` and run the matrix on it (see the module docstring)."""
    row = Row(model_type)
    with quiet():
        try:
            config = matrix_config(model_type)
            model = build(config)
            logits(model, ids(8))
        except Exception as err:  # noqa: BLE001 - a default config transformers cannot build or run
            if not defines_rope(model_type):
                row.frequency = row.attention = row.head = "no-rope"
                return row
            reason = (f"lctx cannot build a tiny {model_type} that runs from its default config "
                      f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})")
            row.frequency_reason = row.attention_reason = reason
            return row
        if not rotaries(model):
            row.frequency = row.attention = row.head = "no-rope"
            return row
        try:
            row.layout = layout_notes(model)
        except Exception as err:  # noqa: BLE001 - the tiny model does not even run
            row.failures.append(f"the tiny model does not run: {type(err).__name__}: {str(err)[:200]}")
            row.frequency = row.attention = "fail"
            return row
        for part, spec, run in (("frequency", "yarn:factor=4", lambda: check_frequencies(model, config, row)),
                                ("attention", ATTENTION_SPECS[0], lambda: check_attention(model, row)),
                                ("head", None, lambda: check_head(model, row))):
            if part not in parts:
                continue
            if spec is not None:
                reason = refusal(config, spec)
                if reason is not None:
                    setattr(row, part, "refused")
                    setattr(row, f"{part}_reason", reason)
                    continue
            failures = len(row.failures)
            try:
                run()
            except Exception as err:  # noqa: BLE001 - a failure of lctx on this model, recorded as such
                row.failures.append(f"{part}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            if part != "head":
                setattr(row, part, "pass" if len(row.failures) == failures else "fail")
        measured = [k for k, v in row.errors.items() if "@" in k and v == v]
        if row.frequency == "pass" and not measured:  # nothing of transformers' own ran to compare with
            row.frequency = "untested"
            row.frequency_reason = "transformers' own RoPE types fail on this model, so there is no reference"
    return row


def defines_rope(model_type: str) -> bool:
    """Whether the type's modeling code has a rotary embedding (a rotary module with an ``inv_freq``; XLNet's
    sinusoidal relative encoding has an ``inv_freq`` too), for types lctx cannot build."""
    import importlib
    import inspect

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        module = importlib.import_module(getattr(__import__("transformers"),
                                                 MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]).__module__)
        source = inspect.getsource(module)
        return "inv_freq" in source and "rotary" in source.lower()
    except Exception:  # noqa: BLE001 - a type whose code does not even import has no RoPE lctx could patch
        return False


def rope_rows(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.frequency != "no-rope"]


def summary(rows: list[Row]) -> dict[str, Any]:
    """Counts over the model types with a rotary embedding (those lctx could not build count as not passing)."""
    rope = rope_rows(rows)
    count = len(rope)

    def share(part: str) -> dict[str, Any]:
        passed = sum(getattr(r, part) == "pass" for r in rope)
        return {"pass": passed, "share": round(passed / count, 3) if count else 0.0,
                "refused": sum(getattr(r, part) == "refused" for r in rope),
                "fail": sum(getattr(r, part) == "fail" for r in rope),
                "untested": sum(getattr(r, part) == "untested" for r in rope)}

    return {"rope_types": count, "frequency": share("frequency"), "attention": share("attention"),
            "head": share("head")}


def run(types: Iterable[str] | None = None, progress: Callable[[str], None] | None = None) -> list[Row]:
    """The matrix over ``types`` (default: every causal-LM model type of the installed transformers)."""
    rows = []
    for model_type in types or causal_lm_types():
        if progress is not None:
            progress(model_type)
        rows.append(check_type(model_type))
    return rows


def report(rows: list[Row]) -> dict[str, Any]:
    """What ``lctx archs --json`` prints: versions, counts, and one entry per model type with a rotary."""
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__, **summary(rows),
            "types": [row.as_dict() for row in rope_rows(rows)],
            "without_rope": sorted(r.model_type for r in rows if r.frequency == "no-rope")}
