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

**lm-eval tasks in lctx eval.** ``--task lm-eval:<task>[,<task>]`` (a task or group name lm-eval knows; with
``--data-dir DIR``, also the task YAMLs in DIR, lm-eval's ``--include_path``) runs
``lm_eval.simple_evaluate`` on the loaded model under each variant. A cell's **length is the max_length
given to the model**: lm-eval left-truncates longer inputs to it (generation prompts to it minus the tokens
to generate); shorter inputs are unchanged, so only tasks with inputs that long vary with it. ``--samples N``
is lm-eval's ``limit`` (first N documents; default all), ``--seed`` its random seed (0, with numpy, torch
and few-shot seeds 1234 + seed: lm-eval's defaults), ``--chat-template`` its ``apply_chat_template``,
``--max-new-tokens`` its ``max_gen_toks``; ``--task-arg num_fewshot=K`` and ``--task-arg batch_size=B`` pass
through. Each record holds every metric lm-eval reports for the task (``acc``, ``acc_stderr``, …; a filter
other than ``none`` is appended as ``metric:filter``) and ``score``: the first of them that lm-eval marks
higher-is-better (perplexity-only tasks have none). A group's subtasks are the record's samples.
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
from lctx.evals import Cell, Context, EvalOptions, Outcome, Report, Task, TaskError, forward_cost, register_family
from lctx.patches import RopeSpec

PREFIX = "lm-eval"
# HFLM arguments that still mean something when lctx loads the model (the others configure loading)
HFLM_ARGS = ("batch_size", "max_batch_size", "max_length", "truncation", "logits_cache", "add_bos_token",
             "prefix_token_id", "softmax_dtype", "mixed_precision_dtype", "think_end_token", "enable_thinking",
             "chat_template_args")
LCTX_ARGS = ("pretrained", "rope", "train_len", "target_len", "dtype", "device", "attn", "device_map")


class ModelArgError(ValueError):
    """A model argument the lctx model does not take."""


@register_model("lctx")
class LctxLM(HFLM):
    """lm-eval's HF model with an lctx RoPE variant applied for its lifetime (see the module docstring)."""

    def __init__(self, pretrained: str | models.Loaded = models.DEFAULT_MODEL, rope: str | RopeSpec | None = "none",
                 train_len: int | None = None, target_len: int | None = None, dtype: str = "auto",
                 device: str | None = "auto", attn: str = "sdpa", device_map: str | None = None,
                 **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(HFLM_ARGS))
        if unknown:
            raise ModelArgError(f"lctx model: unknown model argument(s) {', '.join(map(repr, unknown))}. "
                                f"Valid: {', '.join(LCTX_ARGS + HFLM_ARGS)}")
        spec = rope if isinstance(rope, RopeSpec) else patches.parse("none" if rope is None else str(rope))
        if isinstance(pretrained, models.Loaded):
            loaded = pretrained
        else:
            loaded = models.load(str(pretrained), dtype=str(dtype), device=_device(device), attn=attn,
                                 train_len=None if train_len is None else int(train_len), device_map=device_map)
        target = None if target_len is None else int(target_len)
        self.spec = spec if spec.resolved else spec.resolve(loaded.train_len, target)  # a bad spec fails here
        if kwargs.get("max_length") is None and target is not None:
            kwargs["max_length"] = target
        with _quiet():  # HFLM warns that a model object (not a name) was passed: that is how lctx works
            super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, **kwargs)
        self.loaded = loaded
        self.train_len = loaded.train_len
        self._patch = contextlib.ExitStack()
        self._patch.enter_context(patches.apply(loaded.model, self.spec, self.train_len))

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
            with patches.apply(self.model, self.spec, self.train_len, seq_len=int(max_length)):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
        finally:
            self._patch = contextlib.ExitStack()
            self._patch.enter_context(patches.apply(self.model, self.spec, self.train_len))

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval stores about the model, without its hub lookup (lctx models may be local or offline)."""
        return {"model_num_parameters": self.model.num_parameters(), "model_dtype": str(self.model.dtype),
                "model_revision": None, "model_sha": "", "lctx_model": self.loaded.name,
                "lctx_rope": self.spec.canonical, "lctx_train_len": self.train_len}


def _device(device: str | None) -> str:
    """lctx's device for an lm-eval device argument; CUDA asked for where there is none falls back, as in HFLM."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return "auto"
    return str(device)


@contextlib.contextmanager
def _quiet():
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


# ---- lm-eval tasks in lctx eval -----------------------------------------------------------------------------

_MANAGERS: dict[tuple[str | None, bool], Any] = {}


def task_manager(include: Path | None, name: str):
    """An lm-eval TaskManager that knows ``name``: ``include`` alone when it has it (indexing lm-eval's own
    thousands of tasks takes seconds), else lm-eval's tasks plus ``include``. Cached for the process."""
    from lm_eval.tasks import TaskManager

    attempts = [(str(include), False), (str(include), True)] if include else [(None, True)]
    for path, defaults in attempts:
        key = (path, defaults)
        if key not in _MANAGERS:
            with _quiet():
                _MANAGERS[key] = TaskManager(include_path=path, include_defaults=defaults)
        manager = _MANAGERS[key]
        if name in manager.all_tasks:
            return manager
    close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
    raise TaskError(f"unknown lm-eval task {name!r}" + (f"; close: {', '.join(close)}" if close else "")
                    + ". `lctx lm-eval ls tasks` lists lm-eval's tasks"
                    + (f"; {str(include)!r} (--data-dir) has no such task YAML" if include else
                       "; give local task YAMLs with --data-dir DIR"))


def _int_arg(options: EvalOptions, key: str, minimum: int) -> int | None:
    raw = options.task_args.get(key)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise TaskError(f"--task-arg {key}={raw!r} must be an integer ≥ {minimum}")
    return value


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


class LmEvalTask(Task):
    """One lm-eval task (or group) evaluated per length under each variant (see the module docstring)."""

    metric = "score"
    higher_is_better = True
    memory_profile = "logits"  # HFLM scores continuations from every position's logits
    description = "an lm-eval task or group, run by lm_eval.simple_evaluate on the patched model"

    def __init__(self, task: str) -> None:
        self.task = task
        self.name = f"{PREFIX}:{task}"

    def memory_batch(self, options: EvalOptions) -> int:
        return _int_arg(options, "batch_size", 1) or 1

    def samples(self, options: EvalOptions) -> int | None:  # type: ignore[override]
        return options.samples  # None: every document

    def config(self, options: EvalOptions) -> dict[str, Any]:
        return {"limit": options.samples, "seed": options.seed, "chat_template": options.chat_template,
                "max_new_tokens": options.max_new_tokens, "num_fewshot": _int_arg(options, "num_fewshot", 0),
                "batch_size": _int_arg(options, "batch_size", 1) or 1,
                "include": None if options.data_dir is None else str(Path(options.data_dir).resolve())}

    def validate(self, options: EvalOptions) -> None:
        self.config(options)
        if options.data_dir is not None and not Path(options.data_dir).is_dir():
            raise TaskError(f"--data-dir {str(options.data_dir)!r} is not a directory (lm-eval tasks: a directory "
                            "of task YAMLs)")

    def cost(self, cells: list[Cell], options: EvalOptions) -> float:
        return sum(forward_cost(c.length) for c in cells) * (options.samples or 100)

    def check(self, ctx: Context, cells: list[Cell]) -> None:
        task_manager(ctx.options.data_dir, self.task)

    def run(self, ctx: Context, spec: RopeSpec, cells: list[Cell], report: Report) -> dict[Cell, Outcome]:
        import lm_eval

        options = ctx.options
        config = self.config(options)
        manager = task_manager(options.data_dir, self.task)
        outcomes = {}
        for cell in cells:
            with _quiet(), LctxLM(ctx.loaded, rope=spec, max_length=cell.length,
                                  batch_size=config["batch_size"]) as lm:
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=[self.task], num_fewshot=config["num_fewshot"], limit=options.samples,
                    task_manager=manager, apply_chat_template=options.chat_template, log_samples=False,
                    gen_kwargs=None if options.max_new_tokens is None else {"max_gen_toks": options.max_new_tokens},
                    random_seed=options.seed, numpy_random_seed=1234 + options.seed,
                    torch_random_seed=1234 + options.seed, fewshot_random_seed=1234 + options.seed)
            outcomes[cell] = self.outcome(out, cell)
            report(self.cost([cell], options))
        return outcomes

    def outcome(self, out: dict[str, Any], cell: Cell) -> Outcome:
        """lm-eval's results as a record: the task's (or group's) metrics, and its subtasks' as samples."""
        entry = out.get("groups", {}).get(self.task) or out["results"][self.task]
        metrics = flatten(entry)
        higher = {k: v for part in out.get("higher_is_better", {}).values() for k, v in part.items()}
        score = headline(metrics, higher)
        if score is not None:
            metrics = {"score": metrics[score], **metrics}
        subtasks = [{"task": name, **flatten(values)} for name, values in out["results"].items() if name != self.task]
        n_samples = out.get("n-samples", {})
        return Outcome(metrics=metrics, samples=subtasks, data={
            "lm_eval_task": self.task, "score_metric": score, "max_length": cell.length,
            "documents": {k: v.get("effective") for k, v in n_samples.items()},
            "versions": out.get("versions", {}), "higher_is_better": out.get("higher_is_better", {}),
            "lm_eval_version": _version()})


def _version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


_TASKS: dict[str, LmEvalTask] = {}


def expand(member: str) -> list[Task]:
    """One lm-eval task per name (the same object for the same name, so repeats are dropped)."""
    if not member.strip():
        raise TaskError(f"empty lm-eval task name: use {PREFIX}:<task>[,<task>]")
    return [_TASKS.setdefault(member, LmEvalTask(member))]


register_family(PREFIX, expand, "any lm-eval task or group")
