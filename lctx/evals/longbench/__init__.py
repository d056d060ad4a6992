"""LongBench v1 (``longbench:<task>``, LongBench-E ``longbench:<task>_e``) and LongBench v2 (``longbench-v2``).

Data: ``data_dir=DIR`` (``--data-dir``) reads ``DIR/<task>.jsonl`` (``DIR/<task>_e.jsonl`` for LongBench-E): the
files of LongBench's ``data.zip``, one JSON object per line with ``input``, ``context``, ``answers``, ``length``,
``all_classes``, ``language``, ``dataset`` and ``_id``. LongBench v2 reads ``DIR/longbench_v2.jsonl``, the
official ``DIR/data.json``, or else the one ``.jsonl`` of the directory whose lines are v2 questions. Without a
data directory the data comes from the hub through ``datasets`` (``THUDM/LongBench``, ``THUDM/LongBench-v2``),
which fails at once, naming ``--data-dir``, when the hub is offline. ``samples=N`` takes the first N examples of
a file (default: all).

A cell is (task, length). Each example's prompt is the official template filled with the example, cut in the
middle when it is too long; ``budget`` says by whose convention (its value is in every record's task spec):

* ``budget=official`` (default), LongBench's ``pred.py``: the budget is one ``max_length`` for every task of a
  length, ⌊length·1000/1024⌋ − 500 for v1 (3500, 7500, 15500, 31500 at 4k, 8k, 16k, 32k: model2maxlen.json's
  values for models of those contexts) and ⌊length·120000/131072⌋ for v2 (its 120000 at 128k). Over it, v1 keeps
  ``int(max_length/2)`` ids at each end (one fewer than an odd budget), decodes each half and tokenizes the
  joined text again (which can change ids at the join, and the count by one); v2 keeps ``max_len//2`` first and
  ``⌈max_len/2⌉`` last ids and decodes them as one text. The chat template (``chat_template=true``) wraps the
  truncated text, its tokens not counted, as ``build_chat`` does.
* ``budget=exact``, lctx's convention: the prompt is at most ``length − max_new_tokens`` ids, sliced in token
  space (never decoded and re-encoded), the chat wrapper counted, so prompt and answer never pass the length.

Either way the few-shot and code tasks are not chat-wrapped, as in LongBench. Answers are generated greedily until
an end-of-sequence token; samsum also stops at a newline and cannot stop at its first token, as in LongBench's
``pred.py``. Length-dependent RoPE variants are frozen at prompt + ``max_new_tokens`` per example.

Metrics are those of :mod:`lctx.evals.longbench.metrics`; a record carries ``score`` (×100) and ``examples``,
LongBench-E records also ``score_0-4k``, ``score_4-8k`` and ``score_8k+``, and every example's prediction,
answers and score under ``samples``. Category and overall averages are a summary of the view (``lctx results``,
``lctx report``). ``edit_sim=levenshtein`` switches the code tasks' edit similarity to python-Levenshtein.

LongBench v2 uses ``prompts/0shot.txt`` and LongBench v2's answer extraction ("The correct answer is (X)"). Its
``pred.py`` drops the questions whose output is empty, and ``result.py`` divides by those left: that is the
headline ``accuracy`` (with a Wilson 95% interval, over ``trials`` answered questions; ``excluded`` counts the
others); ``accuracy_strict`` counts empty outputs wrong (over every question). Both come overall and per
difficulty (easy, hard) and length (short, medium, long): ``accuracy_easy``, ``accuracy_strict_easy``, … . The
official setting samples at temperature 0.1; lctx answers greedily (the same answer for every RoPE variant's run).
"""

from __future__ import annotations

import dataclasses
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
    PromptIds,
    exact_prompt,
    official_v1,
    official_v2,
    v1_budget,
    v1_text,
    v2_budget,
    v2_text,
)
from lctx.spec import Param
from lctx.stats import accuracy_metrics

DATA_DIR = Param("data_dir", str, None, "directory of the data files (LongBench's data.zip; LongBench v2's "
                 "data.json); default: the hub, through `datasets`", identity=False)
BUDGET = Param("budget", str, "official", "prompt budget and truncation: official (pred.py's max_length for the "
               "length, middle cut decoded and re-encoded, chat wrapper not counted) or exact (length − "
               "max_new_tokens ids, cut in token space, wrapper counted)", choices=("official", "exact"))
STRICT = Metric("accuracy_strict", True, percent=True, label="accuracy (empty outputs wrong)",
                counts=("correct", "trials_strict"), interval=("ci_low_strict", "ci_high_strict"))


class LongBenchBase(GenerationTask):
    """Shared by v1 and v2: prompts cut to the budget of the ``budget`` convention, answered greedily."""

    hub = ""

    def load(self) -> Loaded:
        raise NotImplementedError

    @functools.cached_property
    def examples(self) -> list:
        """The examples to run: the first ``samples`` of the data (all by default)."""
        return self.load().examples[:self.args.samples]

    def identity(self) -> dict[str, Any]:
        return {"samples": self.args.samples, "data": source_id(self.args.data_dir, self.hub),
                "chat_template": self.args.chat_template, "max_new_tokens": self.args.max_new_tokens,
                "budget": self.args.budget}

    @classmethod
    def upgrade(cls, config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        """Schema-1 records wrote ``samples: "all"`` for every example, and were made with lctx's exact budget."""
        upgraded = {k: v for k, v in config.items() if k != "edit_sim"}
        upgraded.setdefault("budget", "exact")
        if "edit_sim" in config:  # after the budget, as identity() puts it
            upgraded["edit_sim"] = config["edit_sim"]
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

    @property
    def official(self) -> bool:
        return self.args.budget == "official"

    def official_budget(self, length: int) -> int:
        raise NotImplementedError

    def official_rule(self) -> str:
        raise NotImplementedError

    def budget(self, length: int) -> int:
        """The prompt budget of a cell under the ``budget`` convention."""
        return self.official_budget(length) if self.official else length - self.args.max_new_tokens

    def truncate(self, engine: Engine, text: str, length: int) -> PromptIds:
        raise NotImplementedError

    def check(self, engine: Engine, cells: list[Cell]) -> None:
        shortest = min(c.length for c in cells)
        if self.official:
            if self.official_budget(shortest) < 2:
                raise TaskError(f"{self.name}: length {shortest} leaves no prompt under LongBench's official "
                                f"budget ({self.official_rule()} = {self.official_budget(shortest)} tokens); use "
                                "longer lengths, or budget=exact")
            if self.chat:
                engine.chat("")  # no chat template: fail before the model loads
            return
        wrapper = sum(map(len, engine.chat_wrapper())) if self.chat else 0
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

    def prompt(self, engine: Engine, example, length: int) -> PromptIds:
        """An example's prompt ids for a cell ``length``, by the ``budget`` convention."""
        if self.official:
            return self.truncate(engine, self.text(example), self.official_budget(length))
        return exact_prompt(engine, self.text(example), self.budget(length), self.chat)

    def requests(self, engine: Engine, cell: Cell) -> Iterator[GenerateRequest]:
        stops, min_new = self.stops(engine)
        for index, example in enumerate(self.examples):
            prompt = self.prompt(engine, example, cell.length)
            yield GenerateRequest(prompt.ids, self.args.max_new_tokens, stops, min_new, meta=(index, example, prompt))

    def data_record(self, engine: Engine, cell: Cell) -> dict[str, Any]:
        stops, _ = self.stops(engine)
        return {"source": self.load().source, "examples_available": len(self.load().examples),
                "chat_template_applied": self.chat, "bos_added": bool(engine.prefix), "budget": self.args.budget,
                "prompt_budget": self.budget(cell.length), "stop_ids": sorted(stops)}


class LongBenchTask(LongBenchBase):
    """One LongBench v1 task; the member's ``dataset`` and ``e`` (its LongBench-E file) are set by its TaskType."""

    description = "a LongBench v1 task"
    params = (samples_param(None, "examples per cell, the first N of the file (default all)"), DATA_DIR,
              CHAT_TEMPLATE, max_new_tokens_param(128), BUDGET,
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

    def official_budget(self, length: int) -> int:
        return v1_budget(length)

    def official_rule(self) -> str:
        return "⌊length·1000/1024⌋ − 500"

    def truncate(self, engine: Engine, text: str, length: int) -> PromptIds:
        return official_v1(engine, text, length, self.chat)

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
              max_new_tokens_param(V2_MAX_NEW_TOKENS), BUDGET)
    metrics = (dataclasses.replace(ACCURACY, label="accuracy (empty outputs excluded, official)"), STRICT)
    figures = ("lines",)
    hub = HF_V2

    def load(self) -> Loaded:
        return load_v2(self.args.data_dir)

    def official_budget(self, length: int) -> int:
        return v2_budget(length)

    def official_rule(self) -> str:
        return "⌊length·120000/131072⌋"

    def truncate(self, engine: Engine, text: str, length: int) -> PromptIds:
        return official_v2(engine, text, length, self.chat)

    def text(self, example) -> str:
        return v2_text(example)

    def score(self, request: GenerateRequest, answer: Generation) -> dict[str, Any]:
        index, example, prompt = request.meta
        choice = lm.extract_choice(answer.text)
        return {"index": index, "id": example.id, "difficulty": example.difficulty, "length": example.length,
                "prompt_tokens": len(prompt.ids), "full_tokens": prompt.full_tokens, "truncated": prompt.truncated,
                "new_tokens": len(answer.tokens), "response": answer.text, "empty": answer.text == "",
                "prediction": choice, "answer": example.answer, "correct": choice == example.answer}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return v2_metrics(rows)

    def data_record(self, engine: Engine, cell: Cell) -> dict[str, Any]:
        return {**super().data_record(engine, cell), "prompt": V2_TEMPLATE}


def v2_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy both ways, overall and per difficulty and length class (suffixed ``_easy`` …).

    ``accuracy`` is the official one: LongBench v2's pred.py writes no result for an empty output, so result.py
    divides by the questions answered (``trials``; ``excluded`` counts the others); ``accuracy_strict`` counts
    them wrong (``trials_strict``: every question). Each with its Wilson 95% interval.
    """
    def both(part: list[dict[str, Any]], suffix: str = "") -> dict[str, Any]:
        kept = [r for r in part if not r.get("empty")]
        out = {f"{name}{suffix}": value
               for name, value in accuracy_metrics(sum(r["correct"] for r in kept), len(kept)).items()}
        strict = accuracy_metrics(sum(r["correct"] for r in part), len(part))
        for name in ("accuracy", "ci_low", "ci_high", "trials"):
            out[f"{name}_strict{suffix}"] = strict[name]
        return out

    metrics = both(rows)
    metrics["excluded"] = sum(bool(r.get("empty")) for r in rows)
    metrics["unanswered"] = sum(r["prediction"] is None for r in rows)
    for field, groups in (("difficulty", V2_DIFFICULTIES), ("length", V2_LENGTHS)):
        for group in groups:
            metrics.update(both([r for r in rows if r[field] == group], f"_{group}"))
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
