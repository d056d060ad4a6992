"""lm-eval tasks in ``lctx eval``: ``lm-eval:<task>`` runs ``lm_eval.simple_evaluate`` on the loaded model under
each variant, through the bridge's model class (:mod:`lctx.evals.lm_eval_bridge`, imported only when a task runs).

A cell's **length is the max_length given to the model**: lm-eval left-truncates longer inputs to it (generation
prompts to it minus the tokens to generate); shorter inputs are unchanged, so only tasks with inputs that long
vary with it. Parameters: ``samples`` is lm-eval's ``limit`` (first N documents; default all), ``seed`` its
random seed (0, with numpy, torch and few-shot seeds 1234 + seed: lm-eval's defaults), ``chat_template`` its
``apply_chat_template``, ``max_new_tokens`` its ``max_gen_toks``, ``num_fewshot`` and ``batch_size`` pass through,
and ``data_dir`` (``--data-dir``) adds the task YAMLs of a directory (lm-eval's ``--include_path``). Each record
holds every metric lm-eval reports for the task (``acc``, ``acc_stderr``, …; a filter other than ``none`` is
appended as ``metric:filter``), lm-eval's ``higher_is_better`` for them, and ``score``: the first metric lm-eval
marks higher-is-better (perplexity-only tasks have none). A group's subtasks are the record's samples.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lctx.engine import Engine
from lctx.evals import (
    CHAT_TEMPLATE,
    SEED,
    Cell,
    Metric,
    Outcome,
    Report,
    Task,
    TaskError,
    TaskFamily,
    TaskType,
    forward_cost,
    samples_param,
)
from lctx.patches import RopeSpec
from lctx.spec import Param

PREFIX = "lm-eval"
INSTALL = "pip install 'lctx[lm-eval]' (or: pip install 'lm-eval>=0.4.9,<0.5')"


def bridge():
    """The bridge module, or a TaskError saying how to install lm-eval."""
    try:
        from lctx.evals import lm_eval_bridge
    except ImportError as err:
        raise TaskError(f"lm-eval tasks need lm-eval, which is not installed ({err}): {INSTALL}") from None
    return lm_eval_bridge


class LmEvalTask(Task):
    """One lm-eval task (or group) evaluated per length under each variant (see the module docstring)."""

    description = "an lm-eval task or group, run by lm_eval.simple_evaluate on the patched model"
    params = (samples_param(None, "lm-eval's limit: the first N documents (default all)"), SEED, CHAT_TEMPLATE,
              Param("max_new_tokens", int, None, "lm-eval's max_gen_toks (default: the task's)", ge=1),
              Param("num_fewshot", int, None, "few-shot examples (default: the task's)", ge=0),
              Param("batch_size", int, 1, "requests per forward (1 scales dynamic variants per request)", ge=1),
              Param("data_dir", str, None, "a directory of task YAMLs (lm-eval's --include_path)", identity=False))
    metrics = (Metric("score", True, headline=True, label="score (lm-eval's first higher-is-better metric)"),)
    memory_profile = "logits"  # HFLM scores continuations from every position's logits

    @property
    def task(self) -> str:
        return self.name.removeprefix(f"{PREFIX}:")

    @property
    def include(self) -> str | None:
        return None if self.args.data_dir is None else str(Path(self.args.data_dir).resolve())

    def identity(self) -> dict[str, Any]:
        return {"samples": self.args.samples, "seed": self.args.seed, "chat_template": self.args.chat_template,
                "max_new_tokens": self.args.max_new_tokens, "num_fewshot": self.args.num_fewshot,
                "batch_size": self.args.batch_size, "include": self.include}

    @classmethod
    def upgrade(cls, config: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
        """Schema-1 records called ``samples`` by lm-eval's name, ``limit``."""
        upgraded = dict(config)
        if "limit" in upgraded:
            upgraded["samples"] = upgraded.pop("limit")
        return upgraded

    @classmethod
    def record_metrics(cls, record: Mapping[str, Any]) -> tuple[Metric, ...]:
        """``score`` and every metric the record has, in lm-eval's own direction (``higher_is_better``); without a
        ``score`` (a perplexity-only task) the first of them is the headline."""
        declared = (record.get("data") or {}).get("higher_is_better") or {}
        higher = {k: v for part in declared.values() if isinstance(part, dict) for k, v in part.items()}
        recorded = record.get("metrics") or {}
        out = [*cls.metrics] if "score" in recorded else []
        for name in recorded:
            base = name.split(":")[0]
            if name != "score" and base in higher and not base.endswith("_stderr"):
                out.append(Metric(name, bool(higher[base]), headline=not out))
        return tuple(out or cls.metrics)

    def memory_batch(self) -> int:
        return self.args.batch_size

    def count(self) -> int:
        return self.args.samples or 100

    def validate(self) -> None:
        if self.args.data_dir is not None and not Path(self.args.data_dir).is_dir():
            raise TaskError(f"data_dir {self.args.data_dir!r} is not a directory (lm-eval tasks: a directory of "
                            "task YAMLs)")

    def check(self, engine: Engine, cells: list[Cell]) -> None:
        bridge().task_manager(self.args.data_dir and Path(self.args.data_dir), self.task)

    def run(self, engine: Engine, spec: RopeSpec, cells: list[Cell], report: Report) -> dict[Cell, Outcome]:
        import lm_eval

        lm_bridge = bridge()
        manager = lm_bridge.task_manager(self.args.data_dir and Path(self.args.data_dir), self.task)
        seed, limit = self.args.seed, self.args.samples
        gen_kwargs = None if self.args.max_new_tokens is None else {"max_gen_toks": self.args.max_new_tokens}
        outcomes = {}
        for cell in cells:
            with lm_bridge.quiet(), lm_bridge.LctxLM(engine, rope=spec, max_length=cell.length,
                                                     batch_size=self.args.batch_size) as lm:
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=[self.task], num_fewshot=self.args.num_fewshot, limit=limit,
                    task_manager=manager, apply_chat_template=self.args.chat_template, log_samples=False,
                    gen_kwargs=gen_kwargs, random_seed=seed, numpy_random_seed=1234 + seed,
                    torch_random_seed=1234 + seed, fewshot_random_seed=1234 + seed)
            outcomes[cell] = self.outcome(out, cell)
            report(forward_cost(cell.length) * self.count())
        return outcomes

    def outcome(self, out: dict[str, Any], cell: Cell) -> Outcome:
        """lm-eval's results as a record: the task's (or group's) metrics, and its subtasks' as samples."""
        lm_bridge = bridge()
        entry = out.get("groups", {}).get(self.task) or out["results"][self.task]
        metrics = lm_bridge.flatten(entry)
        higher = {k: v for part in out.get("higher_is_better", {}).values() for k, v in part.items()}
        score = lm_bridge.headline(metrics, higher)
        if score is not None:
            metrics = {"score": metrics[score], **metrics}
        subtasks = [{"task": name, **lm_bridge.flatten(values)} for name, values in out["results"].items()
                    if name != self.task]
        n_samples = out.get("n-samples", {})
        return Outcome(metrics=metrics, samples=subtasks, data={
            "lm_eval_task": self.task, "score_metric": score, "max_length": cell.length,
            "documents": {k: v.get("effective") for k, v in n_samples.items()},
            "versions": out.get("versions", {}), "higher_is_better": out.get("higher_is_better", {}),
            "lm_eval_version": _version()})


def _version() -> str | None:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve(member: str) -> list[TaskType]:
    """One lm-eval task per name (checked against lm-eval's own index when the task runs or is checked)."""
    if not member.strip():
        raise TaskError(f"empty lm-eval task name: use {PREFIX}:<task>[,<task>]")
    return [TaskType(f"{PREFIX}:{member}", LmEvalTask, description=f"lm-eval's {member}")]


FAMILY = TaskFamily(PREFIX, "any lm-eval task or group", resolve,
                    lambda: [TaskType(f"{PREFIX}:<task>", LmEvalTask, description=LmEvalTask.description)])
