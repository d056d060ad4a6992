"""LongBench v1 (``longbench:<task>``, LongBench-E ``longbench:<task>_e``) and LongBench v2 (``longbench-v2``).

Data: ``data_dir=DIR`` (``--data-dir``) reads ``DIR/<task>.jsonl`` (``DIR/<task>_e.jsonl`` for LongBench-E): the
files of LongBench's ``data.zip``, one JSON object per line with ``input``, ``context``, ``answers``, ``length``,
``all_classes``, ``language``, ``dataset`` and ``_id``. LongBench v2 reads ``DIR/longbench_v2.jsonl`` or the
official ``DIR/data.json``. Without a data directory the data comes from the hub through ``datasets``
(``THUDM/LongBench``, ``THUDM/LongBench-v2``), which fails at once, naming ``--data-dir``, when the hub is
offline. ``samples=N`` takes the first N examples of a file (default: all).

A cell is (task, length): the length is the context budget in tokens, answer included. Each example's prompt (the
official template, filled with the example) is tokenized once and cut from the middle to ``length −
max_new_tokens`` tokens (``dataset2maxlen.json``), keeping the head and the tail where the instructions and the
question are: the ids are sliced, never decoded and re-encoded, so every prompt fits the budget exactly. Shorter
prompts are kept whole. ``chat_template=true`` wraps the prompt in the tokenizer's chat template (the wrapper's
tokens count against the budget) except for the few-shot and code tasks, as LongBench does. Answers are generated
greedily until an end-of-sequence token; samsum also stops at a newline and cannot stop at its first token, as in
LongBench's ``pred.py``. Length-dependent RoPE variants are frozen at prompt + ``max_new_tokens`` per example.

Metrics are those of :mod:`lctx.evals.longbench.metrics`; a record carries ``score`` (×100) and ``examples``,
LongBench-E records also ``score_0-4k``, ``score_4-8k`` and ``score_8k+``, and every example's prediction,
answers and score under ``samples``. Category and overall averages are a summary of the view (``lctx results``,
``lctx report``). ``edit_sim=levenshtein`` switches the code tasks' edit similarity to python-Levenshtein.

LongBench v2 uses ``prompts/0shot.txt`` and LongBench v2's answer extraction ("The correct answer is (X)"); its
record has ``accuracy`` with a Wilson 95% interval overall and per difficulty (easy, hard) and length (short,
medium, long): ``accuracy_easy``, ``ci_low_easy``, … .
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from lctx.engine import Engine, GenerateRequest, Generation
from lctx.evals import (
    ACCURACY,
    CHAT_TEMPLATE,
    Cell,
    Metric,
    Resample,
    TaskError,
    TaskFamily,
    TaskType,
    max_new_tokens_param,
    samples_param,
)
from lctx.evals.generation import GenerationTask
from lctx.evals.longbench import metrics as lm
from lctx.evals.longbench.data import HF_V1, HF_V2, V2_DIFFICULTIES, V2_LENGTHS, Loaded, load_v1, load_v2, source_id
from lctx.evals.longbench.prompts import (
    CATEGORIES,
    CATEGORY,
    CHINESE,
    CODE,
    DATASETS,
    E_DATASETS,
    MAX_NEW_TOKENS,
    NO_CHAT,
    PROMPTS,
    V2_MAX_NEW_TOKENS,
    V2_TEMPLATE,
    build_prompt,
    v1_text,
    v2_text,
)
from lctx.spec import Param
from lctx.stats import accuracy_metrics

DATA_DIR = Param("data_dir", str, None, "directory of the data files (LongBench's data.zip; LongBench v2's "
                 "data.json); default: the hub, through `datasets`", identity=False)


class LongBenchBase(GenerationTask):
    """Shared by v1 and v2: prompts of at most ``length − max_new_tokens`` tokens, answered greedily."""

    hub = ""

    def load(self) -> Loaded:
        raise NotImplementedError

    @functools.cached_property
    def examples(self) -> list:
        """The examples to run: the first ``samples`` of the data (all by default)."""
        return self.load().examples[:self.args.samples]

    def identity(self) -> dict[str, Any]:
        return {"samples": self.args.samples, "data": source_id(self.args.data_dir, self.hub),
                "chat_template": self.args.chat_template, "max_new_tokens": self.args.max_new_tokens}

    @classmethod
    def upgrade(cls, config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        """Schema-1 records wrote ``samples: "all"`` for every example."""
        upgraded = dict(config)
        if upgraded.get("samples") == "all":
            upgraded["samples"] = None
        return upgraded

    def validate(self) -> None:
        _ = self.examples  # a missing or malformed data file fails here, before any model is loaded

    def count(self) -> int:
        return len(self.examples)

    @property
    def chat(self) -> bool:
        return bool(self.args.chat_template)

    def check(self, engine: Engine, cells: list[Cell]) -> None:
        wrapper = sum(map(len, engine.chat_wrapper())) if self.chat else 0
        shortest = min(c.length for c in cells)
        max_new = self.args.max_new_tokens
        if shortest - max_new < wrapper + 1:
            raise TaskError(
                f"{self.name}: length {shortest} leaves no room for the prompt: {max_new} tokens are kept for the "
                "answer (max_new_tokens)" + (f" and the chat template takes {wrapper}" if wrapper else "")
                + f"; use lengths above {max_new + wrapper}")

    def stops(self, engine: Engine) -> tuple[frozenset[int], int]:
        """Stop ids and the minimum number of new tokens."""
        return engine.eos_ids, 0

    def text(self, example) -> str:
        raise NotImplementedError

    def requests(self, engine: Engine, cell: Cell) -> Iterator[GenerateRequest]:
        stops, min_new = self.stops(engine)
        budget = cell.length - self.args.max_new_tokens
        for index, example in enumerate(self.examples):
            prompt = build_prompt(engine, self.text(example), budget, self.chat)
            yield GenerateRequest(prompt.ids, self.args.max_new_tokens, stops, min_new, meta=(index, example, prompt))

    def data_record(self, engine: Engine, cell: Cell) -> dict[str, Any]:
        stops, _ = self.stops(engine)
        return {"source": self.load().source, "examples_available": len(self.load().examples),
                "chat_template_applied": self.chat, "bos_added": bool(engine.prefix),
                "prompt_budget": cell.length - self.args.max_new_tokens, "stop_ids": sorted(stops)}


class LongBenchTask(LongBenchBase):
    """One LongBench v1 task; the member's ``dataset`` and ``e`` (its LongBench-E file) are set by its TaskType."""

    description = "a LongBench v1 task"
    params = (samples_param(None, "examples per cell, the first N of the file (default all)"), DATA_DIR,
              CHAT_TEMPLATE, max_new_tokens_param(128),
              Param("edit_sim", str, "difflib", "code tasks' edit similarity: fuzzywuzzy's difflib backend or "
                    "python-Levenshtein", choices=lm.EDIT_SIM_BACKENDS))
    metrics = (Metric("score", True, headline=True, label="score (×100)", resample=Resample("score", scale=100)),)
    figures = ("lines",)
    hub = HF_V1
    member_params = ("max_new_tokens", "edit_sim")  # differ between members: not a split of category averages
    dataset = ""  # the member's attrs (see _member)
    e = False
    category = ""

    @property
    def chat(self) -> bool:
        return bool(self.args.chat_template) and self.dataset not in NO_CHAT

    def identity(self) -> dict[str, Any]:
        identity = super().identity()
        if self.dataset in CODE:
            identity["edit_sim"] = self.args.edit_sim
        return identity

    def load(self) -> Loaded:
        return load_v1(self.args.data_dir, self.name.removeprefix("longbench:"), self.dataset)

    def text(self, example) -> str:
        return v1_text(self.dataset, example)

    def stops(self, engine: Engine) -> tuple[frozenset[int], int]:
        if self.dataset == "samsum":  # pred.py: stop at a newline too, but not before the first new token
            return engine.eos_ids | {engine.encode("\n", special=False)[-1]}, 1
        return engine.eos_ids, 0

    def score(self, request: GenerateRequest, answer: Generation) -> dict[str, Any]:
        index, example, prompt = request.meta
        score = lm.score_example(self.dataset, answer.text, example.answers, example.all_classes, self.args.edit_sim)
        return {"index": index, "id": example.id, "length": example.length, "prompt_tokens": len(prompt.ids),
                "full_tokens": prompt.full_tokens, "truncated": prompt.truncated, "new_tokens": len(answer.tokens),
                "prediction": answer.text, "answers": list(example.answers), "score": score}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        scores = [r["score"] for r in rows]
        metrics: dict[str, Any] = {
            "score": lm.task_score(scores), "examples": len(rows),
            "truncated": sum(r["truncated"] for r in rows),
            "prompt_tokens_mean": round(sum(r["prompt_tokens"] for r in rows) / len(rows), 1) if rows else None,
        }
        if self.e:
            lengths = [r["length"] for r in rows]
            for name, value in lm.bucket_scores(scores, lengths).items():
                metrics[f"score_{name}"] = value
                metrics[f"examples_{name}"] = sum(lm.bucket(length) == name for length in lengths)
        return metrics

    def data_record(self, engine: Engine, cell: Cell) -> dict[str, Any]:
        return {**super().data_record(engine, cell), "prompt": PROMPTS[self.dataset],
                "metric": lm.METRICS[self.dataset].__name__, "category": self.category}


class LongBenchV2(LongBenchBase):
    description = ("LongBench v2: 4-choice questions over long documents (0-shot prompt), accuracy overall, by "
                   "difficulty and by length")
    params = (samples_param(None, "questions per cell, the first N (default all)"), DATA_DIR, CHAT_TEMPLATE,
              max_new_tokens_param(V2_MAX_NEW_TOKENS))
    metrics = (ACCURACY,)
    figures = ("lines",)
    hub = HF_V2

    def load(self) -> Loaded:
        return load_v2(self.args.data_dir)

    def text(self, example) -> str:
        return v2_text(example)

    def score(self, request: GenerateRequest, answer: Generation) -> dict[str, Any]:
        index, example, prompt = request.meta
        choice = lm.extract_choice(answer.text)
        return {"index": index, "id": example.id, "difficulty": example.difficulty, "length": example.length,
                "prompt_tokens": len(prompt.ids), "full_tokens": prompt.full_tokens, "truncated": prompt.truncated,
                "new_tokens": len(answer.tokens), "response": answer.text, "prediction": choice,
                "answer": example.answer, "correct": choice == example.answer}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return v2_metrics(rows)

    def data_record(self, engine: Engine, cell: Cell) -> dict[str, Any]:
        return {**super().data_record(engine, cell), "prompt": V2_TEMPLATE}


def v2_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy with a Wilson interval overall and per difficulty and length class (suffixed ``_easy`` …)."""
    metrics = accuracy_metrics(sum(r["correct"] for r in rows), len(rows))
    metrics["unanswered"] = sum(r["prediction"] is None for r in rows)
    for field, groups in (("difficulty", V2_DIFFICULTIES), ("length", V2_LENGTHS)):
        for group in groups:
            part = [r for r in rows if r[field] == group]
            for name, value in accuracy_metrics(sum(r["correct"] for r in part), len(part)).items():
                metrics[f"{name}_{group}"] = value
    return metrics


# ---- the family --------------------------------------------------------------------------------------------


def _member(dataset: str, e: bool) -> TaskType:
    language = "zh" if dataset in CHINESE else "code" if dataset in CODE else "en"
    name = dataset + ("_e" if e else "")
    budget = MAX_NEW_TOKENS[dataset]
    return TaskType(f"longbench:{name}", LongBenchTask, (("max_new_tokens", budget),),
                    f"LongBench{'-E' if e else ''} {dataset} ({CATEGORY[dataset]}, {language}): "
                    f"{lm.METRICS[dataset].__name__}, up to {budget} new tokens",
                    (("dataset", dataset), ("e", e), ("suite", "LongBench-E" if e else "LongBench"),
                     ("category", CATEGORY[dataset])))


MEMBERS = {name: _member(name, False) for name in DATASETS}
MEMBERS.update({f"{name}_e": _member(name, True) for name in E_DATASETS})


def resolve(member: str) -> list[TaskType]:
    """``all``: the 21 LongBench tasks; ``all_e``: the 13 of LongBench-E; else one task by name."""
    if member == "all":
        return [MEMBERS[name] for name in DATASETS]
    if member == "all_e":
        return [MEMBERS[f"{name}_e"] for name in E_DATASETS]
    if member in MEMBERS:
        return [MEMBERS[member]]
    if member.endswith("_e") and member[:-2] in DATASETS:
        raise TaskError(f"LongBench-E has no {member[:-2]!r} (longbench:{member}); its tasks: "
                        f"{', '.join(f'{name}_e' for name in E_DATASETS)}")
    raise TaskError(f"unknown LongBench task {member!r} (longbench:{member}). Valid: all, all_e, "
                    f"{', '.join(DATASETS)}, and for LongBench-E {', '.join(f'{name}_e' for name in E_DATASETS)}")


FAMILY = TaskFamily("longbench", "all|all_e|TASK[_e], e.g. qasper, gov_report_e", resolve,
                    lambda: list(MEMBERS.values()), figure="by_category", summary="categories",
                    categories=tuple(CATEGORIES))
V2 = TaskType("longbench-v2", LongBenchV2)
