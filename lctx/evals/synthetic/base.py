"""What every RULER task shares: the two length conventions (``fit``), haystacks, insertion, scoring.

``fit=ruler`` (the default) builds a cell's prompts with :mod:`lctx.evals.synthetic.ruler`, as RULER's scripts
do: whole texts, tokenized once, prompt + answer within the length. ``fit=exact`` is lctx's own generator, as
lctx had it before issue 18: pieces tokenized on their own and their ids concatenated, the prompt exactly the
length: the tokenizer's prefix (BOS) or, with ``chat_template=true``, the chat template's user turn around the
task; the instruction; the context, exactly as many tokens as remain; the question; the answer prefix. Its keys,
values, word choices, depths and offsets come from ``random.Random`` seeded by (task, seed, length, trial); its
layout is lctx's (a corpus or noise stream from a random sentence start, needles inline at 40 depths, a fixed
key list), and the joined pieces may re-encode to other ids than the text's own. Either way every RoPE variant
sees identical prompts.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from lctx import data
from lctx.engine import Engine, GenerateRequest, Generation, render_chat
from lctx.evals import (
    ACCURACY,
    CHAT_TEMPLATE,
    DATA,
    TEXT_FIELD,
    Cell,
    Metric,
    Resample,
    TaskError,
    samples_param,
)
from lctx.evals.filler import FILLER, nearest
from lctx.evals.generation import GenerationTask
from lctx.evals.synthetic import ruler as generators
from lctx.spec import Param
from lctx.stats import accuracy_metrics

DEPTHS = [round(100 * i / 39) / 100 for i in range(40)]  # RULER: 40 evenly spaced depths in [0, 1]
SENTENCE_ENDS = (".", "!", "?", "\n")
SPAN = 131_072  # corpus haystack windows come from the stream's first SPAN tokens (the default corpus: all of it)
SCORE = Metric("score", True, headline=True, percent=True, label="score (RULER string_match_all)",
               resample=Resample("score"))
ESSAY_CHARS = 20_000_000  # the corpus text read for RULER's essay haystack (its words are taken from the start)


class DataNeeded(TaskError):
    """A prompt that does not fit the requested length (a TaskError: the command asks for too short a length)."""


# ---- scoring ----------------------------------------------------------------------------------------------


def string_match_all(output: str, answers: list[str]) -> list[bool]:
    """RULER's ``string_match_all`` per answer: is it a case-insensitive substring of the output?"""
    low = output.lower()
    return [answer.lower() in low for answer in answers]


def string_match_part(output: str, answers: list[str]) -> float:
    """RULER's ``string_match_part`` for one output (its QA tasks): 1 when any answer is a case-insensitive
    substring of it, else 0 (RULER averages these over the samples, ×100)."""
    low = output.lower()
    return max(1.0 if answer.lower() in low else 0.0 for answer in answers)


def cell_metrics(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """``score`` (mean fraction of answers found) and the all-answers accuracy with its Wilson interval."""
    correct = sum(bool(t["correct"]) for t in trials)
    score = sum(t["score"] for t in trials) / len(trials) if trials else None
    return {"score": score, **accuracy_metrics(correct, len(trials))}


# ---- token-space pieces -------------------------------------------------------------------------------------


def boundaries(tokenizer, ids: list[int]) -> list[bool]:
    """Per token: may an insertion follow it? Yes after ., !, ? or a newline, when whitespace comes next."""
    texts = data.token_texts(tokenizer, ids)
    ends = {i: t.rstrip(" ").endswith(SENTENCE_ENDS) for i, t in texts.items()}
    spaced = {i: t[:1].isspace() for i, t in texts.items()}
    after = ids[1:] + ids[:1]  # the noise text repeats, so its last token is followed by its first
    return [ends[i] and spaced[j] for i, j in zip(ids, after, strict=True)]


def tail_of(unit: list[int], tokens: int) -> list[int]:
    """The last ``tokens`` ids of ``unit`` repeated: padding that reads like the end of a longer text."""
    if tokens <= 0:
        return []
    repeated = unit * (tokens // len(unit) + 1)
    return repeated[len(repeated) - tokens:]


def noise_pad(engine: Engine, tokens: int) -> list[int]:
    """``tokens`` ids ending RULER's noise text, then a newline."""
    return tail_of(engine.piece(" " + FILLER) + engine.piece("\n"), tokens)


@dataclass
class Haystack:
    """A token stream to cut windows from, with per-token sentence-end flags."""

    ids: list[int]
    ends: list[bool]  # an insertion may follow this token
    cyclic: bool  # the noise text repeats; the corpus stream does not
    source: str

    @functools.cached_property
    def starts(self) -> list[int]:
        """Positions that start a sentence (the stream's start included): where windows begin."""
        return [0, *(i + 1 for i, end in enumerate(self.ends[:-1]) if end)]


def noise_haystack(engine: Engine) -> Haystack:
    unit = engine.piece(" " + FILLER)
    return Haystack(unit, boundaries(engine.tokenizer, unit), True, "noise")


def window(haystack: Haystack, tokens: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """``tokens`` ids from a seeded sentence start, and the positions where an insertion may go (sentence ends)."""
    n = len(haystack.ids)
    if haystack.cyclic:
        offset = rng.choice(haystack.starts) % n
        ids = [haystack.ids[(offset + i) % n] for i in range(tokens)]
        ends = [haystack.ends[(offset + i) % n] for i in range(tokens)]
    else:
        last = bisect.bisect_right(haystack.starts, n - tokens)
        offset = rng.choice(haystack.starts[:last]) if last else rng.randrange(n - tokens + 1)
        ids, ends = haystack.ids[offset:offset + tokens], haystack.ends[offset:offset + tokens]
    return ids, sorted({0, tokens, *(i + 1 for i, end in enumerate(ends) if end)})


def insert(ids: list[int], points: list[int], pieces: list[tuple[float, list[int]]]) -> list[int]:
    """``ids`` with each piece inserted at the boundary nearest its depth, in the order given."""
    at = [nearest(points, depth * len(ids)) for depth, _ in pieces]
    out, start = [], 0
    for position, (_, piece) in sorted(zip(at, pieces, strict=True), key=lambda p: p[0]):
        out += ids[start:position] + piece
        start = position
    return out + ids[start:]


# ---- prompts ------------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """One trial: the exact-length prompt, what the output must contain, and what to record about it."""

    ids: list[int]
    answers: list[str]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Body:
    """A trial's text around its context: instruction before it, question and answer prefix after it."""

    instruction: str
    question: str
    answer_prefix: str


def haystack_param(default: str, choices: tuple[str, ...]) -> Param:
    return Param("haystack", str, default, "what the context is made of: corpus (the task's data, RULER's essay), "
                 "noise (RULER's repeated sentences) or needles (distractor needles, one per line)", choices=choices)


SEED = Param("seed", int, 42, "seed of the prompts' random draws (RULER's --random_seed, 42)", ge=0)
FIT = Param("fit", str, "ruler", "length convention and layout: ruler (RULER's generator: its layout and draws, "
            "prompt + answer within the length) or exact (lctx's: the prompt exactly the length, built in token "
            "space, the answer after it)", choices=("ruler", "exact"))
COMMON = (samples_param(5, "trials per length"), SEED, CHAT_TEMPLATE, FIT, DATA, TEXT_FIELD)


class SyntheticTask(GenerationTask):
    """One RULER generator; members of the family are presets of its parameters (see lctx.evals.synthetic)."""

    metrics = (SCORE, dataclasses.replace(ACCURACY, headline=False))
    figures = ("lines",)
    ruler: str = ""  # the RULER task a member follows (set from its TaskType's attrs)
    template: str = ""  # its template in RULER's constants.py

    def __init__(self, name: str, args: Mapping[str, Any]) -> None:
        super().__init__(name, args)
        self._haystack: tuple[tuple[int, int], Haystack] | None = None  # the last corpus haystack (they are large)
        self._cells: dict[tuple[int, int], tuple[Any, list[Prompt]]] = {}  # RULER's prompts of the last cells

    # -- parameters --

    @property
    def exact(self) -> bool:
        return self.args.get("fit") == "exact"

    @property
    def haystack_kind(self) -> str | None:
        return self.args.get("haystack")

    @property
    def reads_corpus(self) -> bool:
        return self.haystack_kind == "corpus"

    def identity(self) -> dict[str, Any]:
        identity = super().identity()
        if self.reads_corpus:
            identity["data"] = self.corpus.id
        else:
            identity.pop("data", None)
        return identity

    @classmethod
    def upgrade(cls, config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        """Schema-1 records were made by lctx's exact-length generator (``fit=exact``) at seed 0 unless given."""
        upgraded = super().upgrade(config, {**defaults, "fit": "exact", "seed": 0})
        if "data" not in config:
            upgraded.pop("data", None)
        return upgraded

    @functools.cached_property
    def corpus(self) -> data.Corpus:
        return data.corpus(self.args.data, self.args.text_field)

    def validate(self) -> None:
        if self.reads_corpus:
            _ = self.corpus  # a bad data path fails here, before any model loads

    # -- building --

    def body(self, plan: dict[str, Any]) -> Body:
        raise NotImplementedError

    def plan(self, engine: Engine, rng: random.Random, length: int) -> dict[str, Any]:
        """Everything random about a trial (keys, values, names, word orders) and its ``answers``.

        Keys starting with ``_`` are working state; the others (and what :meth:`context` adds) are recorded
        with the trial.
        """
        raise NotImplementedError

    def context(self, engine: Engine, plan: dict[str, Any], budget: int, rng: random.Random) -> list[int]:
        """Exactly ``budget`` context ids for the plan."""
        raise NotImplementedError

    def example(self, engine: Engine, plan: dict[str, Any], length: int, rng: random.Random) -> list[int]:
        """RULER's worked example placed before the task (variable-tracking, common-words); [] otherwise."""
        return []

    def corpus_haystack(self, engine: Engine, tokens: int) -> Haystack:
        """The corpus's documents joined by blank lines, read up to a span that depends on ``tokens`` alone.

        Windows are drawn from the first SPAN tokens of the stream (the next multiple of it for longer windows),
        so a cell's prompts never depend on which other cells, shards or resumes share the run. DataError when
        the corpus has fewer than ``tokens``.
        """
        wanted = -(-max(tokens, 1) // SPAN) * SPAN
        key = (id(engine.tokenizer), wanted)
        if self._haystack is None or self._haystack[0] != key:
            ids = data.token_stream(self.corpus, engine.tokenizer, wanted).ids[:wanted]
            self._haystack = key, Haystack(ids, boundaries(engine.tokenizer, ids), False, self.corpus.id)
        haystack = self._haystack[1]
        if len(haystack.ids) < tokens:
            raise data.DataError(f"{self.name}: the haystack needs {tokens} tokens but {self.corpus.describe(1)} has "
                                 f"only {len(haystack.ids)}; use shorter --lengths, a longer corpus (data=…) or "
                                 "haystack=noise")
        return haystack

    def haystack(self, engine: Engine, tokens: int) -> Haystack:
        return self.corpus_haystack(engine, tokens) if self.reads_corpus else noise_haystack(engine)

    def assemble(self, engine: Engine, plan: dict[str, Any], length: int, rng: random.Random, example: list[int],
                 chat: bool) -> list[int]:
        """Prefix + example + instruction + context + question + answer prefix, exactly ``length`` ids."""
        text = self.body(plan)
        if chat:
            head, tail = engine.chat_wrapper()
            after = engine.piece(text.question) + tail + engine.piece(text.answer_prefix.lstrip())
        else:
            head, after = engine.prefix, engine.piece(text.question) + engine.piece(text.answer_prefix)
        before = head + example + engine.piece(text.instruction)
        budget = length - len(before) - len(after)
        if budget < 1:
            raise DataNeeded(f"{self.name}: length {length} is too short; the prompt without its context already "
                             f"has {len(before) + len(after)} tokens")
        ids = before + self.context(engine, plan, budget, rng) + after
        assert len(ids) == length, (self.name, len(ids), length)
        return ids

    def build(self, engine: Engine, length: int, trial: int) -> Prompt:
        """The trial's prompt; identical for every model with this tokenizer, corpus, seed and parameters."""
        rng = random.Random(f"{self.name}|{self.args.seed}|{length}|{trial}")  # str seeds are stable
        plan = self.plan(engine, rng, length)
        example = self.example(engine, plan, length, rng)
        ids = self.assemble(engine, plan, length, rng, example, self.args.chat_template)
        return Prompt(ids, plan["answers"], {k: v for k, v in plan.items() if k != "answers" and k[0] != "_"})

    # -- running --

    # -- RULER's generator (fit=ruler) --

    def essay(self) -> list[str]:
        """RULER's essay haystack from the corpus: its documents' words (whitespace runs made single spaces)."""
        text, read = [], 0
        for doc in self.corpus.documents(1):
            text.append(doc.text)
            read += len(doc.text)
            if read >= ESSAY_CHARS:
                break
        return generators.essay_words("\n\n".join(text))

    def ruler_template(self, engine: Engine, chat: bool) -> str:
        """prepare.py's template: the task's (in the chat template when asked) followed by its answer prefix."""
        task, prefix = generators.TEMPLATES[self.template]
        return (render_chat(engine.tokenizer, task) if chat else task) + prefix

    def ruler_samples(self, engine: Engine, cell: generators.Cell) -> list[generators.Sample]:
        raise NotImplementedError

    def ruler_texts(self, engine: Engine, length: int) -> list[generators.Sample]:
        """The cell's prompts as RULER generates them, as texts (all at once: each sample continues the draws
        of RULER's search and of the samples before it)."""
        chat = bool(self.args.chat_template)
        cell = generators.Cell(lambda text: len(engine.encode(text, special=False)), length,
                               self.args.max_new_tokens, self.args.seed, self.ruler_template(engine, chat))
        try:
            return self.ruler_samples(engine, cell)
        except (generators.DoesNotFit, generators.RepeatedNames) as err:
            raise DataNeeded(f"{self.name}: length {length}: {err}; use longer --lengths") from None

    def ruler_prompts(self, engine: Engine, length: int) -> list[Prompt]:
        """:meth:`ruler_texts` tokenized, each as one text; cached for the last two cells."""
        key = (id(engine.tokenizer), length)
        found = self._cells.get(key)
        if found is not None and found[0] is engine.tokenizer:
            return found[1]
        special = not self.args.chat_template  # a chat template's text has its own special tokens
        prompts = [Prompt(engine.encode(s.text, special=special), s.answers,
                          {**s.info, "ruler_length": s.tokens + self.args.max_new_tokens})
                   for s in self.ruler_texts(engine, length)]
        while len(self._cells) >= 2:
            del self._cells[next(iter(self._cells))]
        self._cells[key] = (engine.tokenizer, prompts)
        return prompts

    def prompts(self, engine: Engine, length: int) -> list[Prompt]:
        """The cell's trials under the ``fit`` convention."""
        if self.exact:
            return [self.build(engine, length, trial) for trial in range(self.args.samples)]
        return self.ruler_prompts(engine, length)

    # -- running --

    def check(self, engine: Engine, cells: list[Cell]) -> None:
        """Build every trial at the shortest length (too short?) and one at the longest (corpus too small?)."""
        lengths = sorted({c.length for c in cells})
        if not self.exact:
            self.ruler_prompts(engine, lengths[0])
            self.ruler_prompts(engine, lengths[-1])
            return
        for trial in range(self.args.samples):
            self.build(engine, lengths[0], trial)
        self.build(engine, lengths[-1], 0)

    def requests(self, engine: Engine, cell: Cell) -> Iterator[GenerateRequest]:
        for trial, prompt in enumerate(self.prompts(engine, cell.length)):
            yield GenerateRequest(prompt.ids, self.args.max_new_tokens, engine.eos_or_pad, meta=(trial, prompt))

    def match(self, output: str, answers: list[str]) -> tuple[list[bool], float]:
        """Which answers the output holds and the trial's score: RULER's string_match_all."""
        found = string_match_all(output, answers)
        return found, sum(found) / len(found)

    def score(self, request: GenerateRequest, answer: Generation) -> dict[str, Any]:
        trial, prompt = request.meta
        found, score = self.match(answer.text, prompt.answers)
        return {"trial": trial, "answers": prompt.answers, "output": answer.text, "found": found,
                "score": score, "correct": score == 1, "prompt_tokens": len(prompt.ids), **prompt.info}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return cell_metrics(rows)

    def data_record(self, engine: Engine, cell: Cell) -> dict[str, Any]:
        record = {"ruler_task": self.ruler, "bos_added": bool(engine.prefix) and not self.args.chat_template,
                  "chat_template": self.args.chat_template, "fit": self.args.get("fit", "ruler")}
        if self.haystack_kind is not None:
            record["haystack"] = self.haystack_kind
        if self.reads_corpus:
            record["corpus"] = self.corpus.id
            record["corpus_description"] = self.corpus.describe(1)
        return record

