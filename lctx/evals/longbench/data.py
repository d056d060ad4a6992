"""LongBench data: v1 ``<task>.jsonl`` lines and v2 questions, from a local directory or the hub, checked field by
field so that a malformed file fails before any model loads, naming the line and the field."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lctx.data import DataError

HF_V1 = "THUDM/LongBench"
HF_V2 = "THUDM/LongBench-v2"
DATA_ZIP = "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"
CLASSIFICATION = frozenset({"trec", "lsht"})
V2_FILES = ("longbench_v2.jsonl", "data.json")
V2_DIFFICULTIES = ("easy", "hard")
V2_LENGTHS = ("short", "medium", "long")


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


def _data_dir(data_dir: str) -> Path:
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        raise DataError(f"data_dir {data_dir!r} is not a directory")
    return directory


def load_v1(data_dir: str | None, file: str, dataset: str) -> Loaded:
    """The examples of ``<file>.jsonl`` (``file`` is a task name, with ``_e`` for LongBench-E)."""
    def parse(row: Any, where: str) -> Example:
        return parse_v1(row, where, dataset)

    if data_dir is None:
        return _load_hub(HF_V1, file, "test", parse, f"pass --data-dir DIR holding {file}.jsonl (LongBench's "
                         f"data.zip: {DATA_ZIP})")
    path = _data_dir(data_dir) / f"{file}.jsonl"
    if not path.is_file():
        raise DataError(f"longbench:{file}: no data file {str(path)!r}; --data-dir must hold LongBench's "
                        f"{file}.jsonl (from {DATA_ZIP})")
    return _load_file(path, parse)


def _is_v2_file(path: Path) -> bool:
    """Does the first line of this .jsonl hold a LongBench v2 question (a ``choice_A`` field)?"""
    try:
        with path.open(encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        row = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(row, dict) and "choice_A" in row


def v2_file(directory: Path) -> Path:
    """LongBench v2's file in ``directory``: longbench_v2.jsonl, the official data.json, or else the one .jsonl
    whose lines are v2 questions (a split saved under its own name); DataError when none or several."""
    for name in V2_FILES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(p for p in directory.glob("*.jsonl") if p.is_file() and _is_v2_file(p))
    if len(found) == 1:
        return found[0]
    if found:
        raise DataError(f"longbench-v2: --data-dir {str(directory)!r} holds several LongBench v2 files "
                        f"({', '.join(p.name for p in found)}); keep one, or name it {V2_FILES[0]}")
    raise DataError(f"longbench-v2: --data-dir {str(directory)!r} holds neither {' nor '.join(V2_FILES)} "
                    f"nor another .jsonl of LongBench v2 questions (LongBench v2's data.json from {HF_V2}, or the "
                    "same examples one per line)")


def load_v2(data_dir: str | None) -> Loaded:
    if data_dir is None:
        return _load_hub(HF_V2, None, "train", parse_v2, f"pass --data-dir DIR holding LongBench v2's data.json "
                         f"(from {HF_V2}) or its examples one per line as {V2_FILES[0]}")
    return _load_file(v2_file(_data_dir(data_dir)), parse_v2)


def source_id(data_dir: str | None, hub: str) -> str:
    """Where the data comes from, for cell identities: the data directory as given, or the hub dataset."""
    return str(data_dir) if data_dir is not None else f"hf:{hub}"
