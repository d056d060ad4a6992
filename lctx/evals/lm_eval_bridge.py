"""The lm-eval bridge: lm-eval's HF model under a RoPE variant, and ``lm-eval:<task>`` tasks in ``lctx eval``.

**The model class.** :class:`LctxLM` subclasses lm-eval 0.4's ``HFLM`` and is registered under the name
``lctx`` when this module is imported (lm-eval 0.4 has no plugin entry point for models; ``lctx lm-eval``
imports it, then hands its arguments to lm-eval's own CLI unchanged). Model arguments: ``pretrained`` (an
lctx model reference: hub id, local directory, ``.gguf`` file or the ``smollm2-135m`` alias, loaded by
:func:`lctx.models.load`), ``rope`` (a spec, default ``none``), ``train_len`` and ``target_len`` (as in ``lctx
eval``), ``dtype``/``device``/``attn``/``device_map`` in lctx's meaning (``auto`` is bf16 on CUDA, fp32 on
CPU; on lm-eval's command line the device is ``--device``, whose default ``cuda:0`` falls back to the CPU when
there is no CUDA, as in HFLM), and
HFLM's own evaluation arguments (``batch_size``, ``max_length``, ``add_bos_token``, …); ``max_length``
defaults to ``target_len`` when that is given. The patch is applied on construction and stays for the
object's lifetime; ``close()`` (or ``with``) restores the model.

**Dynamic variants.** A length-dependent variant (``dynamic-ntk``, ``dynamic-yarn``) is scaled by the length
of the forward that starts a sequence. *Loglikelihood* requests (and rolling loglikelihood windows) are one
forward each, so each is scaled for its own context + continuation, left-truncated to ``max_length``; with
``batch_size`` > 1 a batch is right-padded to its longest request, which then sets the scale for all of it
(keep the default ``batch_size=1`` to score every request at its own length). *Generation* is frozen at
prompt + ``max_gen_toks`` (the padded batch's prompt), as lctx's own generation tasks do, so the prefill and
every decoding step share one set of frequencies.

**lm-eval tasks in lctx eval** (``lm-eval:<task>``) are :mod:`lctx.evals.lm_eval_task`, which imports this
module only when it runs one (importing lctx never imports lm-eval).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from lctx import models, patches
from lctx.engine import Engine
from lctx.evals import TaskError
from lctx.options import RUN_PARAMS
from lctx.patches import RopeSpec
from lctx.spec import SpecError

# HFLM arguments that still mean something when lctx loads the model (the others configure loading)
HFLM_ARGS = ("batch_size", "max_batch_size", "max_length", "truncation", "logits_cache", "add_bos_token",
             "prefix_token_id", "softmax_dtype", "mixed_precision_dtype", "think_end_token", "enable_thinking",
             "chat_template_args")
LCTX_ARGS = ("pretrained", "rope", "train_len", "target_len", "dtype", "device", "attn", "device_map")
TRAIN_LEN, TARGET_LEN = (next(p for p in RUN_PARAMS if p.name == name) for name in ("train_len", "target_len"))


class ModelArgError(ValueError):
    """A model argument the lctx model does not take."""


@register_model("lctx")
class LctxLM(HFLM):
    """lm-eval's HF model with an lctx RoPE variant applied for its lifetime (see the module docstring)."""

    def __init__(self, pretrained: str | models.Loaded | Engine = models.DEFAULT_MODEL,
                 rope: str | RopeSpec | None = "none",
                 train_len: int | None = None, target_len: int | None = None, dtype: str = "auto",
                 device: str | None = "auto", attn: str = "sdpa", device_map: str | None = None,
                 **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(HFLM_ARGS))
        if unknown:
            raise ModelArgError(f"lctx model: unknown model argument(s) {', '.join(map(repr, unknown))}. "
                                f"Valid: {', '.join(LCTX_ARGS + HFLM_ARGS)}")
        spec = rope if isinstance(rope, RopeSpec) else patches.parse("none" if rope is None else str(rope))
        try:  # lm-eval hands model arguments over as text: checked by the same declarations as lctx eval's
            train_len = None if train_len is None else TRAIN_LEN.convert(train_len, "lctx model")
            target_len = None if target_len is None else TARGET_LEN.convert(target_len, "lctx model")
        except SpecError as err:
            raise ModelArgError(str(err)) from None
        if isinstance(pretrained, Engine):
            engine = pretrained
        elif isinstance(pretrained, models.Loaded):
            engine = Engine.from_loaded(pretrained)
        else:
            loaded = models.load(str(pretrained), dtype=str(dtype), device=_device(device), attn=attn,
                                 train_len=train_len, device_map=device_map)
            engine = Engine.from_loaded(loaded)
        target = target_len
        self.spec = spec if spec.resolved else spec.resolve(engine.train_len, target)  # a bad spec fails here
        if kwargs.get("max_length") is None and target is not None:
            kwargs["max_length"] = target
        with quiet():  # HFLM warns that a model object (not a name) was passed: that is how lctx works
            super().__init__(pretrained=engine.model, tokenizer=engine.tokenizer, **kwargs)
        self.engine = engine
        self.train_len = engine.train_len
        self._patch = contextlib.ExitStack()
        self._patch.enter_context(self.engine.session(self.spec))

    def close(self) -> None:
        """Take the patch off (the model is bit-exactly as loaded again)."""
        self._patch.close()

    def __enter__(self) -> LctxLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        """Length-dependent variants scale once for prompt + new tokens (``max_length``), like lctx's tasks."""
        if not self.spec.length_dependent:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        self._patch.close()
        try:
            with self.engine.session(self.spec, seq_len=int(max_length)):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
        finally:
            self._patch = contextlib.ExitStack()
            self._patch.enter_context(self.engine.session(self.spec))

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval stores about the model, without its hub lookup (lctx models may be local or offline)."""
        return {"model_num_parameters": self.model.num_parameters(), "model_dtype": str(self.model.dtype),
                "model_revision": None, "model_sha": "", "lctx_model": self.engine.name,
                "lctx_rope": self.spec.canonical, "lctx_train_len": self.train_len}


def _device(device: str | None) -> str:
    """lctx's device for an lm-eval device argument; CUDA asked for where there is none falls back, as in HFLM."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return "auto"
    return str(device)


@contextlib.contextmanager
def quiet():
    """lm-eval's logger at ERROR for the block (its warnings about lctx's own choices are noise)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def cli(args: list[str]) -> int:
    """lm-eval's command line with ``args``, the ``lctx`` model registered; returns its exit status."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = saved
    return 0


# ---- helpers of lctx.evals.lm_eval_task --------------------------------------------------------------------

_MANAGERS: dict[tuple[str | None, bool], Any] = {}


def task_manager(include: Path | None, name: str):
    """An lm-eval TaskManager that knows ``name``: ``include`` alone when it has it (indexing lm-eval's own
    thousands of tasks takes seconds), else lm-eval's tasks plus ``include``. Cached for the process."""
    from lm_eval.tasks import TaskManager

    attempts = [(str(include), False), (str(include), True)] if include else [(None, True)]
    for path, defaults in attempts:
        key = (path, defaults)
        if key not in _MANAGERS:
            with quiet():
                _MANAGERS[key] = TaskManager(include_path=path, include_defaults=defaults)
        manager = _MANAGERS[key]
        if name in manager.all_tasks:
            return manager
    close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
    raise TaskError(f"unknown lm-eval task {name!r}" + (f"; close: {', '.join(close)}" if close else "")
                    + ". `lctx lm-eval ls tasks` lists lm-eval's tasks"
                    + (f"; {str(include)!r} (--data-dir) has no such task YAML" if include else
                       "; give local task YAMLs with --data-dir DIR"))


def flatten(entry: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": …}`` as ``{"acc": 0.5, "acc_stderr": 0.1}``."""
    out = {}
    for key, value in entry.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        name, filt = key.split(",", 1)
        out[name if filt == "none" else f"{name}:{filt}"] = value
    return out


def headline(metrics: dict[str, float], higher: dict[str, bool]) -> str | None:
    """The first reported metric lm-eval marks higher-is-better (its stderr excluded)."""
    for name in metrics:
        if not name.split(":")[0].endswith("_stderr") and higher.get(name.split(":")[0]) is True:
            return name
    return None
