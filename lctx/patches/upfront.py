"""Refuse a variant from the model's config alone, before any weights load (one line saying why).

The config is built twice without weights: on the meta device (the real shapes: does it have RoPE, how many
frequency pairs) and as a tiny random copy (:mod:`lctx.patches.tiny`) that the variant is applied to for one
short forward. Whatever lctx cannot find or patch on the tiny copy (no rotary, no attention seam, a rotation
layout no candidate matches, frequencies that are not θ^(−2i/d), a ``layers`` choice the model cannot honour)
is refused here, never per cell after the model has loaded.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from lctx.patches.arch import UnsupportedModelError, no_rope_error, rotaries, text_config
from lctx.patches.tiny import TRAIN_LEN, VOCAB, tiny_config


def _build(config: Any, meta: bool):
    """The model of ``config`` with its own attention implementation, or eager where transformers has no SDPA."""
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    with torch.device("meta") if meta else contextlib.nullcontext():
        torch.manual_seed(0)
        try:
            return AutoModelForCausalLM.from_config(config).eval()
        except ValueError as err:
            if "does not support an attention implementation" not in str(err):
                raise
            return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


_PASSED: set[tuple[str, str, int | None, int | None]] = set()  # checks passed in this process (plans repeat)


def check(config: Any, spec: Any, train_len: int | None = None, target_len: int | None = None) -> None:
    """Raise UnsupportedModelError when ``spec`` cannot be applied to a model of ``config``; SpecError for a spec
    that cannot be resolved. Loads no weights: takes about a second (once per config and spec in a process)."""
    from lctx import patches

    spec = patches.parse(spec) if isinstance(spec, str) else spec
    key = (config.to_json_string(), spec.canonical, train_len, target_len)
    if key in _PASSED:
        return
    _check(config, spec, train_len, target_len)
    _PASSED.add(key)


def _check(config: Any, spec: Any, train_len: int | None, target_len: int | None) -> None:
    from lctx import patches

    arch = getattr(text_config(config), "model_type", type(config).__name__)
    try:
        meta = _build(config, meta=True)
    except Exception as err:  # noqa: BLE001 - transformers' own refusal, reported as one line
        raise UnsupportedModelError(f"{arch}: transformers cannot build a model from this config ({_reason(err)})"
                                    ) from None
    found = rotaries(meta)
    if not found:
        raise no_rope_error(arch)
    values = dict(spec.params)
    for key in ("short_factor", "long_factor"):
        given = values.get(key)
        if given is not None and not any(len(given) == r.inv_freq.numel() for r in found):
            raise UnsupportedModelError(f"{spec.name}: {key} has {len(given)} values; {arch} rotates "
                                        f"{', '.join(str(r.inv_freq.numel()) for r in found)} frequency pairs")
    try:
        tiny = _build(tiny_config(config), meta=False)
    except Exception:  # noqa: BLE001 - no tiny copy: the structural checks above are all that can run
        return
    pairs = {r.inv_freq.numel() for r in rotaries(tiny)}
    dry = patches.RopeSpec(spec.name, tuple(
        (k, [1.0] * min(pairs) if k in ("short_factor", "long_factor") and v is not None else v)
        for k, v in spec.params))
    resolved = dry.resolve(TRAIN_LEN, None if target_len is None or train_len is None
                           else round(TRAIN_LEN * target_len / train_len))
    ids = torch.arange(3, 3 + 2 * TRAIN_LEN)[None] % VOCAB
    try:
        with torch.no_grad(), patches.apply(tiny, resolved, TRAIN_LEN):
            tiny(input_ids=ids, use_cache=False)
    except UnsupportedModelError:
        raise
    except Exception as err:  # noqa: BLE001 - the real model would fail the same way, after loading
        raise UnsupportedModelError(f"{spec.name} on {arch}: a tiny copy of the model fails under the patch "
                                    f"({_reason(err)})") from None
