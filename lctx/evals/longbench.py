"""LongBench v1 (``longbench:<task>``, LongBench-E ``longbench:<task>_e``) and LongBench v2 (``longbench-v2``).

Data: ``--data-dir DIR`` reads ``DIR/<task>.jsonl`` (``DIR/<task>_e.jsonl`` for LongBench-E): the files of
LongBench's ``data.zip``, one JSON object per line with ``input``, ``context``, ``answers``, ``length``,
``all_classes``, ``language``, ``dataset`` and ``_id``. LongBench v2 reads ``DIR/longbench_v2.jsonl`` or the
official ``DIR/data.json`` (``question``, ``choice_A``…``choice_D``, ``answer``, ``context``, ``difficulty``,
``length``). Without ``--data-dir`` the data comes from the hub through ``datasets`` (``THUDM/LongBench``,
``THUDM/LongBench-v2``), which fails at once, naming ``--data-dir``, when the hub is offline. ``--samples N``
takes the first N examples of a file (default: all).

A cell is (task, length): the length is the context budget in tokens, answer included. Each example's prompt
(the official template of ``config/dataset2prompt.json``, filled with the example) is tokenized once and cut
from the middle to ``length − max_new_tokens`` tokens (``dataset2maxlen.json``; ``--max-new-tokens``
overrides), keeping the head and the tail where the instructions and the question are: the ids are sliced,
never decoded and re-encoded, so every prompt fits the budget exactly. Shorter prompts are kept whole.
``--chat-template`` wraps the prompt in the tokenizer's chat template (the wrapper's tokens count against the
budget) except for the few-shot and code tasks (trec, triviaqa, samsum, lsht, lcc, repobench-p), as LongBench
does. Answers are generated greedily (:func:`lctx.evals.passkey.greedy`) until an end-of-sequence token;
samsum also stops at a newline and cannot stop at its first token, as in LongBench's ``pred.py``. Length-
dependent RoPE variants are frozen at prompt + ``max_new_tokens`` per example.

Metrics are those of :mod:`lctx.evals.longbench_metrics`; a record carries ``score`` (×100) and ``examples``,
LongBench-E records also ``score_0-4k``, ``score_4-8k`` and ``score_8k+`` (by the examples' ``length``
field), and every example's prediction, answers and score under ``samples``. :func:`aggregate` averages stored
records into the six categories and overall (``lctx results`` prints it). ``--task-arg edit_sim=levenshtein``
switches the code tasks' edit similarity from fuzzywuzzy's difflib backend to its python-Levenshtein one.

LongBench v2 uses ``prompts/0shot.txt`` and LongBench v2's answer extraction ("The correct answer is (X)");
its record has ``accuracy`` with a Wilson 95% interval overall and per difficulty (easy, hard) and length
(short, medium, long): ``accuracy_easy``, ``ci_low_easy``, ``ci_high_easy``, ``correct_easy``,
``trials_easy`` and so on.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lctx import data, patches, results
from lctx.data import DataError
from lctx.evals import (
    Cell,
    Context,
    EvalOptions,
    Outcome,
    Report,
    Task,
    TaskError,
    forward_cost,
    register,
    register_family,
)
from lctx.evals import longbench_metrics as lm
from lctx.evals.passkey import accuracy_metrics, chat_wrapper, greedy
from lctx.patches import RopeSpec

HF_V1 = "THUDM/LongBench"
HF_V2 = "THUDM/LongBench-v2"
DATA_ZIP = "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"

# config/dataset2prompt.json
PROMPTS = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase "
        "if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in "
        "the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on "
        "the above article as concisely as you can, using a single phrase or sentence if possible. If the "
        "question cannot be answered based on the information in the article, write \"unanswerable\". If the "
        "question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
        "explanation.\n\nQuestion: {input}\n\nAnswer:"),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
        "Answer:"),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
        "\n\n问题：{input}\n回答："),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
        "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"),
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n"
                "问题：{input}\n回答：",
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": ("Please determine the type of the question below. Here are some examples of questions.\n\n"
             "{context}\n{input}"),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n{input}"),
    "samsum": ("Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
               "{context}\n\n{input}"),
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the "
        "final count of unique paragraphs after removing duplicates. The output format should only contain the "
        "number, such as 1, 2, 3, and so on.\n\nThe final answer is: "),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number "
        "of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", "
        "\"Paragraph 2\", etc.\n\nThe answer is: "),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        "请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是："),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
PROMPTS["2wikimqa"] = PROMPTS["musique"] = PROMPTS["hotpotqa"]

# config/dataset2maxlen.json
MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

# the six categories of the LongBench paper, in its order
CATEGORIES = {
    "single-doc QA": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "multi-doc QA": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "few-shot": ("trec", "triviaqa", "samsum", "lsht"),
    "synthetic": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "code": ("lcc", "repobench-p"),
}
CATEGORY = {task: category for category, tasks in CATEGORIES.items() for task in tasks}
DATASETS = tuple(CATEGORY)  # the 21 tasks, in LongBench's order
CHINESE = frozenset({"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"})
E_DATASETS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
              "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})  # pred.py: no chat wrapping
CLASSIFICATION = frozenset({"trec", "lsht"})
CODE = frozenset({"lcc", "repobench-p"})
KEY_NOT_SHARED = ("max_new_tokens", "edit_sim")  # config keys that differ between tasks of one run

# prompts/0shot.txt of LongBench v2
V2_TEMPLATE = (
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\nWhat is the "
    "correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\nFormat your "
    "response as follows: \"The correct answer is (insert answer here)\"."
)
V2_MAX_NEW_TOKENS = 128
V2_FILES = ("longbench_v2.jsonl", "data.json")
V2_DIFFICULTIES = ("easy", "hard")
V2_LENGTHS = ("short", "medium", "long")


# ---- data --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One LongBench v1 line."""

    id: str
    input: str
    context: str
    answers: tuple[str, ...]
    length: int
    all_classes: tuple[str, ...] | None


@dataclass(frozen=True)
class ChoiceExample:
    """One LongBench v2 question."""

    id: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str
    context: str
    difficulty: str
    length: str


@dataclass
class Loaded:
    """A task's examples and where they came from."""

    source: str  # file path, or hf:NAME[:config]
    examples: list


_LOADED: dict[tuple, Loaded] = {}  # the last data sets parsed, by (source, size, mtime); see _remember
_KEEP = 2  # the task being run and the one checked next: every task's text at once would take hundreds of MB


def _remember(key: tuple, loaded: Loaded) -> Loaded:
    _LOADED.pop(key, None)
    _LOADED[key] = loaded
    while len(_LOADED) > _KEEP:
        del _LOADED[next(iter(_LOADED))]
    return loaded


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _read_rows(path: Path) -> list[tuple[str, Any]]:
    """(location, row) for each line of a .jsonl file, or each item of a .json list."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {str(path)!r}: {err}") from None
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(items, list):
            raise DataError(f"{path} must hold a JSON list of examples, not a {type(items).__name__}")
        return [(f"{path}[{i}]", item) for i, item in enumerate(items)]
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): texts hold U+2028 and the like
        if line.strip():
            try:
                rows.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number} is not valid JSON ({err.msg}); each line of a LongBench "
                                ".jsonl file is one JSON object") from None
    return rows


def _field(row: Any, where: str, name: str, kind: type | None, schema: str) -> Any:
    """``row[name]``, of type ``kind`` unless None; DataError naming the place, the field and the schema."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with the fields {schema}, found {type(row).__name__}")
    if name not in row:
        raise DataError(f"{where}: missing field {name!r} (a line has {schema}; found: {', '.join(row) or 'none'})")
    value = row[name]
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise DataError(f"{where}: field {name!r} must be a {kind.__name__}, not {type(value).__name__} "
                        f"({value!r:.80})")
    return value


def _strings(value: Any, where: str, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {name!r} must be a list of strings, not {value!r:.80}")
    return tuple(value)


V1_SCHEMA = "input, context, answers, length, all_classes, language, dataset, _id"


def parse_v1(row: Any, where: str, dataset: str) -> Example:
    """A LongBench v1 line as an :class:`Example`; DataError naming the line and field when it does not fit."""
    answers = _strings(_field(row, where, "answers", None, V1_SCHEMA), where, "answers")
    if not answers:
        raise DataError(f"{where}: field 'answers' is empty; an example needs at least one reference answer")
    classes = row.get("all_classes")
    if dataset in CLASSIFICATION:
        if classes is None:
            raise DataError(f"{where}: {dataset} is a classification task; its lines need 'all_classes' (a list)")
        classes = _strings(classes, where, "all_classes")
    elif classes is not None:
        classes = _strings(classes, where, "all_classes")
    return Example(id=str(row.get("_id", where)), input=_field(row, where, "input", str, V1_SCHEMA),
                   context=_field(row, where, "context", str, V1_SCHEMA), answers=answers,
                   length=_field(row, where, "length", int, V1_SCHEMA), all_classes=classes)


V2_SCHEMA = "_id, question, choice_A, choice_B, choice_C, choice_D, answer, context, difficulty, length"


def parse_v2(row: Any, where: str) -> ChoiceExample:
    """A LongBench v2 question as a :class:`ChoiceExample`; DataError naming the line and field when it does not fit."""
    text = {name: _field(row, where, name, str, V2_SCHEMA)
            for name in ("question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context",
                         "difficulty", "length")}
    for name, valid in (("answer", ("A", "B", "C", "D")), ("difficulty", V2_DIFFICULTIES), ("length", V2_LENGTHS)):
        if text[name] not in valid:
            raise DataError(f"{where}: field {name!r} is {text[name]!r}; valid: {', '.join(valid)}")
    return ChoiceExample(id=str(row.get("_id", where)), question=text["question"],
                         choices=(text["choice_A"], text["choice_B"], text["choice_C"], text["choice_D"]),
                         answer=text["answer"], context=text["context"], difficulty=text["difficulty"],
                         length=text["length"])


def _load_file(path: Path, parse: Callable[[Any, str], Any]) -> Loaded:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _LOADED:
        return _remember(key, _LOADED[key])
    examples = [parse(row, where) for where, row in _read_rows(path)]
    if not examples:
        raise DataError(f"{path} has no examples")
    return _remember(key, Loaded(str(path), examples))


def _load_hub(name: str, config: str | None, split: str, parse: Callable[[Any, str], Any], hint: str) -> Loaded:
    """A hub dataset through ``datasets``; DataError ending in ``hint`` (what to pass as --data-dir) on failure."""
    label = name + (f":{config}" if config else "")
    if _offline():
        raise DataError(f"no --data-dir given and the HuggingFace hub is offline (HF_HUB_OFFLINE/"
                        f"HF_DATASETS_OFFLINE), so {label} cannot be downloaded: {hint}")
    key = ("hf", label, split)
    if key in _LOADED:
        return _remember(key, _LOADED[key])
    import datasets

    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types (ConnectionError, OSError, ValueError…)
        message = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot load {label} through `datasets` ({type(err).__name__}: {message}); "
                        f"{hint}") from None
    examples = [parse(dict(row), f"{label}[{i}]") for i, row in enumerate(rows)]
    if not examples:
        raise DataError(f"{label} ({split}) has no examples")
    return _remember(key, Loaded(f"hf:{label}", examples))


def _data_dir(options: EvalOptions) -> Path:
    directory = Path(options.data_dir).expanduser()
    if not directory.is_dir():
        raise DataError(f"--data-dir {str(options.data_dir)!r} is not a directory")
    return directory


def load_v1(options: EvalOptions, file: str, dataset: str) -> Loaded:
    """The examples of ``<file>.jsonl`` (``file`` is a task name, with ``_e`` for LongBench-E)."""
    def parse(row: Any, where: str) -> Example:
        return parse_v1(row, where, dataset)

    if options.data_dir is None:
        return _load_hub(HF_V1, file, "test", parse, f"pass --data-dir DIR holding {file}.jsonl (LongBench's "
                         f"data.zip: {DATA_ZIP})")
    path = _data_dir(options) / f"{file}.jsonl"
    if not path.is_file():
        raise DataError(f"longbench:{file}: no data file {str(path)!r}; --data-dir must hold LongBench's "
                        f"{file}.jsonl (from {DATA_ZIP})")
    return _load_file(path, parse)


def load_v2(options: EvalOptions) -> Loaded:
    if options.data_dir is None:
        return _load_hub(HF_V2, None, "train", parse_v2, f"pass --data-dir DIR holding LongBench v2's data.json "
                         f"(from {HF_V2}) or its examples one per line as {V2_FILES[0]}")
    directory = _data_dir(options)
    for name in V2_FILES:
        if (directory / name).is_file():
            return _load_file(directory / name, parse_v2)
    raise DataError(f"longbench-v2: --data-dir {str(directory)!r} holds neither {' nor '.join(V2_FILES)} "
                    f"(LongBench v2's data.json from {HF_V2}, or the same examples one per line)")


def source_id(options: EvalOptions, hub: str) -> str:
    """Where the data comes from, for cell keys: the --data-dir as given, or the hub dataset."""
    return str(options.data_dir) if options.data_dir is not None else f"hf:{hub}"


# ---- prompts -----------------------------------------------------------------------------------------------


@dataclass
class PromptIds:
    ids: list[int]
    full_tokens: int  # before truncation
    chat: bool

    @property
    def truncated(self) -> bool:
        return self.full_tokens > len(self.ids)


def middle_truncate(ids: list[int], budget: int) -> list[int]:
    """The first ⌊budget/2⌋ and last ⌈budget/2⌉ ids when there are more than ``budget``."""
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head):]


def build_prompt(tokenizer, text: str, budget: int, chat: bool) -> PromptIds:
    """``text`` as ids of at most ``budget`` tokens, cut in the middle; wrapped in the chat template if ``chat``.

    Without the chat template the ids are the tokenizer's own prefix (BOS) and the text; with it, the
    template's ids around the text, whose middle is cut so that the whole fits.
    """
    if chat:
        before, after = chat_wrapper(tokenizer)
        body = data.encode(tokenizer, text, special=False)
        room = budget - len(before) - len(after)
        return PromptIds(before + middle_truncate(body, room) + after, len(before) + len(body) + len(after), True)
    ids = data.special_prefix(tokenizer) + data.encode(tokenizer, text, special=False)
    return PromptIds(middle_truncate(ids, budget), len(ids), False)


def v1_text(dataset: str, example: Example) -> str:
    return PROMPTS[dataset].format(context=example.context, input=example.input)


def v2_text(example: ChoiceExample) -> str:
    """prompts/0shot.txt filled as LongBench v2's pred.py does (successive replaces of stripped fields)."""
    text = V2_TEMPLATE.replace("$DOC$", example.context.strip()).replace("$Q$", example.question.strip())
    for letter, choice in zip("ABCD", example.choices, strict=True):
        text = text.replace(f"$C_{letter}$", choice.strip())
    return text


def stop_ids(ctx: Context) -> set[int]:
    """End-of-sequence ids of the tokenizer and of the model's generation config."""
    ids = {ctx.tokenizer.eos_token_id}
    eos = getattr(getattr(ctx.model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list | tuple) else [eos])
    return {i for i in ids if i is not None}


# ---- tasks -------------------------------------------------------------------------------------------------


class GenerationTask(Task):
    """Shared by v1 and v2: prompts of at most ``length − max_new_tokens`` tokens, answered greedily."""

    higher_is_better = True
    default_max_new_tokens: int

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}  # examples per --data-dir, for cost estimates without re-reading

    def chat(self, options: EvalOptions) -> bool:
        return options.chat_template

    def max_new_tokens(self, options: EvalOptions) -> int:
        return options.max_new_tokens or self.default_max_new_tokens

    def load(self, options: EvalOptions) -> Loaded:
        raise NotImplementedError

    def selected(self, options: EvalOptions) -> list:
        """The examples to run: the first ``--samples`` of the data (all by default)."""
        loaded = self.load(options)
        self._counts[str(options.data_dir)] = len(loaded.examples)
        return loaded.examples[:options.samples]

    def count(self, options: EvalOptions) -> int:
        """How many examples a cell runs."""
        if str(options.data_dir) not in self._counts:
            self.selected(options)
        return min(self._counts[str(options.data_dir)], options.samples or math.inf)

    def validate(self, options: EvalOptions) -> None:
        if options.max_new_tokens is not None and options.max_new_tokens < 1:
            raise TaskError(f"--max-new-tokens {options.max_new_tokens} must be at least 1")
        self.selected(options)  # a missing or malformed data file fails here, before any model is loaded

    def cost(self, cells: list[Cell], options: EvalOptions) -> float:
        return sum(forward_cost(c.length) for c in cells) * self.count(options)

    def check(self, ctx: Context, cells: list[Cell]) -> None:
        wrapper = sum(map(len, chat_wrapper(ctx.tokenizer))) if self.chat(ctx.options) else 0
        shortest = min(c.length for c in cells)
        max_new = self.max_new_tokens(ctx.options)
        if shortest - max_new < wrapper + 1:
            raise TaskError(
                f"{self.name}: length {shortest} leaves no room for the prompt: {max_new} tokens are kept for the "
                f"answer (--max-new-tokens)" + (f" and the chat template takes {wrapper}" if wrapper else "")
                + f"; use lengths above {max_new + wrapper}")

    def generate(self, ctx: Context, spec: RopeSpec, prompt: PromptIds, max_new: int, stops: set[int],
                 min_new_tokens: int = 0) -> tuple[str, int]:
        """(decoded answer, number of new tokens); length-dependent variants scale for prompt + max_new."""
        with patches.apply(ctx.model, spec, ctx.train_len, seq_len=len(prompt.ids) + max_new):
            new = greedy(ctx.model, prompt.ids, max_new, stops, min_new_tokens, ctx.options.prefill_chunk)
        return ctx.tokenizer.decode(new, skip_special_tokens=True), len(new)


class LongBenchTask(GenerationTask):
    """One LongBench v1 task (``e``: its LongBench-E file)."""

    metric = "score"

    def __init__(self, dataset: str, e: bool = False):
        super().__init__()
        self.dataset = dataset
        self.e = e
        self.file = dataset + ("_e" if e else "")
        self.name = f"longbench:{self.file}"
        self.default_max_new_tokens = MAX_NEW_TOKENS[dataset]
        language = "zh" if dataset in CHINESE else "code" if dataset in CODE else "en"
        self.description = (f"LongBench{'-E' if e else ''} {dataset} ({CATEGORY[dataset]}, {language}): "
                            f"{lm.METRICS[dataset].__name__}, up to {self.default_max_new_tokens} new tokens")

    def chat(self, options: EvalOptions) -> bool:
        return options.chat_template and self.dataset not in NO_CHAT

    def edit_sim(self, options: EvalOptions) -> str:
        return options.task_args.get("edit_sim", "difflib")

    def load(self, options: EvalOptions) -> Loaded:
        return load_v1(options, self.file, self.dataset)

    def config(self, options: EvalOptions) -> dict[str, Any]:
        config = {"samples": options.samples or "all", "data": source_id(options, HF_V1),
                  "chat_template": options.chat_template, "max_new_tokens": self.max_new_tokens(options)}
        if self.dataset in CODE:
            config["edit_sim"] = self.edit_sim(options)
        return config

    def validate(self, options: EvalOptions) -> None:
        if self.dataset in CODE and self.edit_sim(options) not in lm.EDIT_SIM_BACKENDS:
            raise TaskError(f"--task-arg edit_sim={self.edit_sim(options)!r} is not a backend; valid: "
                            f"{', '.join(lm.EDIT_SIM_BACKENDS)}")
        super().validate(options)

    def run(self, ctx: Context, spec: RopeSpec, cells: list[Cell], report: Report) -> dict[Cell, Outcome]:
        options = ctx.options
        examples: list[Example] = self.selected(options)
        loaded = self.load(options)
        max_new = self.max_new_tokens(options)
        chat = self.chat(options)
        stops = stop_ids(ctx)
        min_new = 0
        if self.dataset == "samsum":  # pred.py: stop at a newline too, but not before the first new token
            stops.add(data.encode(ctx.tokenizer, "\n", special=False)[-1])
            min_new = 1
        edit_sim = self.edit_sim(options)
        outcomes = {}
        for cell in cells:
            rows = []
            for index, example in enumerate(examples):
                prompt = build_prompt(ctx.tokenizer, v1_text(self.dataset, example), cell.length - max_new, chat)
                prediction, new_tokens = self.generate(ctx, spec, prompt, max_new, stops, min_new)
                score = lm.score_example(self.dataset, prediction, example.answers, example.all_classes, edit_sim)
                rows.append({"index": index, "id": example.id, "length": example.length,
                             "prompt_tokens": len(prompt.ids), "full_tokens": prompt.full_tokens,
                             "truncated": prompt.truncated, "new_tokens": new_tokens, "prediction": prediction,
                             "answers": list(example.answers), "score": score})
                report(forward_cost(cell.length))
            outcomes[cell] = Outcome(metrics=self.metrics(rows), samples=rows, data={
                "source": loaded.source, "examples_available": len(loaded.examples), "prompt": PROMPTS[self.dataset],
                "metric": lm.METRICS[self.dataset].__name__, "category": CATEGORY[self.dataset],
                "chat_template_applied": chat, "bos_added": bool(data.special_prefix(ctx.tokenizer)),
                "prompt_budget": cell.length - max_new, "stop_ids": sorted(stops)})
        return outcomes

    def metrics(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
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


@register
class LongBenchV2(GenerationTask):
    name = "longbench-v2"
    description = ("LongBench v2: 4-choice questions over long documents (0-shot prompt), accuracy overall, by "
                   "difficulty and by length")
    metric = "accuracy"
    default_max_new_tokens = V2_MAX_NEW_TOKENS

    def load(self, options: EvalOptions) -> Loaded:
        return load_v2(options)

    def config(self, options: EvalOptions) -> dict[str, Any]:
        return {"samples": options.samples or "all", "data": source_id(options, HF_V2),
                "chat_template": options.chat_template, "max_new_tokens": self.max_new_tokens(options)}

    def run(self, ctx: Context, spec: RopeSpec, cells: list[Cell], report: Report) -> dict[Cell, Outcome]:
        options = ctx.options
        examples: list[ChoiceExample] = self.selected(options)
        loaded = self.load(options)
        max_new = self.max_new_tokens(options)
        chat = self.chat(options)
        stops = stop_ids(ctx)
        outcomes = {}
        for cell in cells:
            rows = []
            for index, example in enumerate(examples):
                prompt = build_prompt(ctx.tokenizer, v2_text(example), cell.length - max_new, chat)
                response, new_tokens = self.generate(ctx, spec, prompt, max_new, stops)
                choice = lm.extract_choice(response)
                rows.append({"index": index, "id": example.id, "difficulty": example.difficulty,
                             "length": example.length, "prompt_tokens": len(prompt.ids),
                             "full_tokens": prompt.full_tokens, "truncated": prompt.truncated,
                             "new_tokens": new_tokens, "response": response, "prediction": choice,
                             "answer": example.answer, "correct": choice == example.answer})
                report(forward_cost(cell.length))
            outcomes[cell] = Outcome(metrics=v2_metrics(rows), samples=rows, data={
                "source": loaded.source, "examples_available": len(loaded.examples), "prompt": V2_TEMPLATE,
                "chat_template_applied": chat, "bos_added": bool(data.special_prefix(ctx.tokenizer)),
                "prompt_budget": cell.length - max_new, "stop_ids": sorted(stops)})
        return outcomes


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

TASKS: dict[str, LongBenchTask] = {name: LongBenchTask(name) for name in DATASETS}
TASKS.update({f"{name}_e": LongBenchTask(name, e=True) for name in E_DATASETS})
MEMBERS = "all|all_e|TASK[_e], e.g. qasper, gov_report_e"


def expand(member: str) -> list[Task]:
    """``all``: the 21 LongBench tasks; ``all_e``: the 13 of LongBench-E; else one task by name."""
    if member == "all":
        return [TASKS[name] for name in DATASETS]
    if member == "all_e":
        return [TASKS[f"{name}_e"] for name in E_DATASETS]
    if member in TASKS:
        return [TASKS[member]]
    if member.endswith("_e") and member[:-2] in DATASETS:
        raise TaskError(f"LongBench-E has no {member[:-2]!r} (longbench:{member}); its tasks: "
                        f"{', '.join(f'{name}_e' for name in E_DATASETS)}")
    raise TaskError(f"unknown LongBench task {member!r} (longbench:{member}). Valid: all, all_e, "
                    f"{', '.join(DATASETS)}, and for LongBench-E {', '.join(f'{name}_e' for name in E_DATASETS)}")


register_family("longbench", expand, MEMBERS)
# tables show each task's headline metric (results.tables defaults to perplexity for tasks it does not know)
results.HEADLINE.update({task.name: ("score",) for task in TASKS.values()})
results.HEADLINE[LongBenchV2.name] = ("accuracy",)


# ---- aggregation -------------------------------------------------------------------------------------------


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 2) if present else None


def _averages(scores: dict[str, float | None]) -> tuple[dict[str, float | None], float | None]:
    """Category means of the tasks present, and their mean (LongBench's "Avg")."""
    categories = {category: _mean(scores.get(t) for t in tasks) for category, tasks in CATEGORIES.items()
                  if any(t in scores for t in tasks)}
    return categories, _mean(categories.values())


def aggregate(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """LongBench category and overall averages of stored records, one row per run setting.

    Records of ``longbench:*`` tasks with status ok are grouped by suite (LongBench, LongBench-E), model,
    variant, length, training length, dtype, attention and the run's options (``config`` without the per-task
    ``max_new_tokens`` and ``edit_sim``). A row has the task scores, the mean of each category over its tasks
    present, and ``overall``, the mean of the categories (as LongBench's leaderboard averages them); LongBench-E
    rows also have ``buckets``: the same per length bucket.
    """
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for record in records:
        name = str(record.get("task", ""))
        task = TASKS.get(name.removeprefix("longbench:")) if name.startswith("longbench:") else None
        if task is None or record.get("status") != "ok":
            continue
        config = {k: v for k, v in (record.get("config") or {}).items() if k not in KEY_NOT_SHARED}
        key = ("LongBench-E" if task.e else "LongBench", record.get("model"), record.get("rope"),
               record.get("length"), record.get("train_len"), record.get("dtype"), record.get("attn"),
               json.dumps(config, sort_keys=True, default=str))
        groups.setdefault(key, {})[task.dataset] = record
    rows = []
    for (suite, model, rope, length, train_len, dtype, attn, config), by_task in groups.items():
        scores = {name: r["metrics"].get("score") for name, r in by_task.items()}
        categories, overall = _averages(scores)
        row = {"suite": suite, "model": model, "rope": rope,
               "rope_input": next(iter(by_task.values())).get("rope_input") or rope, "length": length,
               "train_len": train_len, "dtype": dtype, "attn": attn, "config": json.loads(config),
               "tasks": scores, "categories": categories, "overall": overall}
        if suite == "LongBench-E":
            row["buckets"] = {}
            for name in lm.BUCKETS:
                cats, total = _averages({t: r["metrics"].get(f"score_{name}") for t, r in by_task.items()})
                row["buckets"][name] = {"categories": cats, "overall": total}
        rows.append(row)
    return rows


def category_tables(records: Iterable[dict[str, Any]]) -> list[tuple[str, pd.DataFrame]]:
    """:func:`aggregate` as printable tables: one per suite, model, settings and length; variants × categories."""
    rows = aggregate(records)
    out = []
    settings = dict.fromkeys(
        (r["suite"], r["model"], r["length"], r["train_len"], r["dtype"], r["attn"], json.dumps(r["config"]))
        for r in rows)
    for suite, model, length, train_len, dtype, attn, config in settings:
        part = [r for r in rows if (r["suite"], r["model"], r["length"], r["train_len"], r["dtype"], r["attn"],
                                    json.dumps(r["config"])) == (suite, model, length, train_len, dtype, attn, config)]
        columns = [c for c in CATEGORIES if any(c in r["categories"] for r in part)] + ["overall"]
        if suite == "LongBench-E":
            columns += [f"overall {name}" for name in lm.BUCKETS]

        def cell(row: dict[str, Any], column: str) -> str:
            if column.startswith("overall "):
                value = row["buckets"][column.removeprefix("overall ")]["overall"]
            else:
                value = row["overall"] if column == "overall" else row["categories"].get(column)
            return "–" if value is None else f"{value:.2f}"

        frame = pd.DataFrame([[cell(r, c) for c in columns] for r in part],
                             index=pd.Index([r["rope_input"] for r in part], name="rope"), columns=columns)
        tasks = sorted({t for r in part for t in r["tasks"]})
        past = "*" if train_len and length > train_len else ""
        title = (f"{suite} by category (score ×100; overall = mean of categories) · {model} · "
                 f"length {results.format_length(length)}{past} · train_len {train_len} · {dtype}/{attn} · "
                 f"{len(tasks)} tasks: {', '.join(tasks)}")
        out.append((title, frame))
    return out
