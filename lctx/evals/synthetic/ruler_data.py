"""The data RULER's generators (:mod:`lctx.evals.synthetic.ruler`) draw from, read as RULER's scripts read it:
wonderwords' word lists (niah's keys, common words), RULER's ``english_words.json`` for common words past the ~8.2k
of wonderwords' lists (a Git LFS file of its repository, read from ``data_dir`` when a length needs it), and the
SQuAD and HotpotQA files of its QA task.
"""

from __future__ import annotations

import bisect
import functools
import importlib.metadata
import importlib.resources
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lctx.data import DataError

# ---- word lists ---------------------------------------------------------------------------------------------


def _wonderwords(name: str) -> list[str]:
    """A wonderwords list as RULER reads it (``random_word._get_words_from_text_file``: lines, right-stripped)."""
    text = importlib.resources.files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
    return [line.rstrip() for line in text.splitlines(keepends=True)]


def word_lists() -> str:
    """Which wonderwords made the keys and words (its lists changed between releases), for the records."""
    return f"wonderwords {importlib.metadata.version('wonderwords')}"


class KeyWords(Sequence[str]):
    """niah.py's keys, ``sorted(set(f"{adj}-{noun}"))`` over wonderwords' adjectives and nouns (6 million),
    indexed without building them: runs of one adjective are contiguous in the order, except where adjectives
    interleave (``blue-`` and ``blue-eyed-``), which are merged and sorted explicitly."""

    def __init__(self, adjectives: list[str], nouns: list[str]) -> None:
        self.nouns = sorted(set(nouns))
        ranges = sorted((f"{a}-{self.nouns[0]}", f"{a}-{self.nouns[-1]}", a) for a in set(adjectives))
        self.blocks: list[list[str] | str] = []  # an adjective (its nouns in order) or an explicit sorted run
        groups: list[list[str]] = []
        end = ""
        for first, last, adjective in ranges:
            if groups and first <= end:
                groups[-1].append(adjective)
                end = max(end, last)
            else:
                groups.append([adjective])
                end = last
        starts = [0]
        for group in groups:
            if len(group) == 1:
                self.blocks.append(group[0])
                starts.append(starts[-1] + len(self.nouns))
            else:
                merged = sorted({f"{a}-{n}" for a in group for n in self.nouns})
                self.blocks.append(merged)
                starts.append(starts[-1] + len(merged))
        self.starts = starts

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index):  # noqa: ANN001 - Sequence's int or slice
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        block = bisect.bisect_right(self.starts, index) - 1
        offset = index - self.starts[block]
        found = self.blocks[block]
        return found[offset] if isinstance(found, list) else f"{found}-{self.nouns[offset]}"


@functools.cache
def key_words() -> KeyWords:
    return KeyWords(_wonderwords("adjectivelist.txt"), _wonderwords("nounlist.txt"))


@functools.cache
def common_words(seed: int) -> list[str]:
    """common_words_extraction.py's list: wonderwords' nouns, adjectives and verbs, deduplicated, sorted, and
    shuffled by ``random.Random(seed)``."""
    words = sorted(set(_wonderwords("nounlist.txt") + _wonderwords("adjectivelist.txt")
                       + _wonderwords("verblist.txt")))
    random.Random(seed).shuffle(words)
    return words


def english_words(data_dir: str | None) -> list[str]:
    """RULER's ``json/english_words.json`` (its values), which common_words_extraction.py samples from when a
    list needs more words than wonderwords has."""
    if data_dir is None or not (Path(data_dir) / "english_words.json").is_file():
        raise DataError("at this length RULER's common words come from its english_words.json (a Git LFS file of "
                        "NVIDIA/RULER: scripts/data/synthetic/json/english_words.json); put it in --data-dir")
    return list(json.loads((Path(data_dir) / "english_words.json").read_text(encoding="utf-8")).values())


# ---- QA data ------------------------------------------------------------------------------------------------


@dataclass
class QaData:
    """A QA set as qa.py holds it: questions (their documents as indices) and the documents."""

    questions: list[dict[str, Any]]
    documents: list[str]


def read_squad(path: Path) -> QaData:
    """qa.py's read_squad: SQuAD v2's answerable questions, each with its paragraph and its article's others."""
    data = json.loads(path.read_text(encoding="utf-8"))
    documents = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(documents)}
    questions = []
    for article in data["data"]:
        more = [index[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                if not qa["is_impossible"]:
                    own = index[paragraph["context"]]
                    questions.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                      "context": [own], "more_context": [i for i in more if i != own]})
    return QaData(questions, documents)


def read_hotpotqa(path: Path) -> QaData:
    """qa.py's read_hotpotqa: each question with its paragraphs ("title\\nsentences")."""
    data = json.loads(path.read_text(encoding="utf-8"))
    documents = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(documents)}
    return QaData([{"query": d["question"], "outputs": [d["answer"]],
                    "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]} for d in data], documents)
