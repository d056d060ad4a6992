"""Needle in a haystack (``niah``): the passkey grid with a real-text haystack and a configurable needle.

The haystack is the task's corpus (``data``, default the Python reference manual), its documents' ids joined by a
blank line, read from a seeded offset within the first :data:`HAYSTACK_SPAN` tokens of that stream (so a cell's
prompts never depend on the other cells of a run). The needle (``needle``, must contain ``{value}``, replaced by
a seeded 7-digit number) goes to the sentence end (a token ending in ``.``, ``!``, ``?`` or a newline) nearest
to the requested depth; the question (``question``) follows the haystack on a new line and should end with an
answer prefix so that base models answer with the number. Prompts, generation and scoring are those of
:mod:`lctx.evals.passkey`.
"""

from __future__ import annotations

import functools
import random
from typing import Any

from lctx import data
from lctx.engine import Engine
from lctx.evals import (
    CHAT_TEMPLATE,
    DATA,
    DEPTHS,
    SEED,
    TEXT_FIELD,
    Cell,
    TaskError,
    TaskType,
    max_new_tokens_param,
    samples_param,
)
from lctx.evals.passkey import Filler, RetrievalTask
from lctx.spec import Param

NEEDLE = "The special magic number is {value}."
QUESTION = "What is the special magic number? The special magic number is"
SENTENCE_ENDS = (".", "!", "?", "\n")
# Needle offsets are drawn from the first HAYSTACK_SPAN tokens of the corpus stream (a multiple of it for
# longer prompts): the whole default corpus (~113k tokens), a bounded read of a streamed dataset.
HAYSTACK_SPAN = 131_072


class NeedleInAHaystack(RetrievalTask):
    description = "find a 7-digit number (needle) hidden at a depth in real text from the corpus"
    params = (samples_param(5, "trials per (length, depth) cell"), SEED, DEPTHS, max_new_tokens_param(12),
              CHAT_TEMPLATE,
              Param("needle", str, NEEDLE, "the needle sentence; {value} stands for the number"),
              Param("question", str, QUESTION, "the question after the haystack, ending in an answer prefix"),
              DATA, TEXT_FIELD)
    digits = 7

    def validate(self) -> None:
        needle = self.args.needle
        if "{value}" not in needle:
            raise TaskError(f"niah: needle={needle!r} must contain {{value}} where the number goes, e.g. {NEEDLE!r}")
        try:
            needle.format(value=0)
        except (IndexError, KeyError, ValueError):
            raise TaskError(f"niah: needle={needle!r}: only {{value}} may appear in braces") from None
        _ = self.corpus  # a bad data path fails here, before any model loads

    @functools.cached_property
    def corpus(self) -> data.Corpus:
        return data.corpus(self.args.data, self.args.text_field)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "needle": self.args.needle.strip(), "question": self.args.question.strip(),
                "data": self.corpus.id}

    def pieces(self) -> tuple[str, str, str]:
        needle, question = self.args.needle, self.args.question
        needle = needle if needle[:1].isspace() else " " + needle
        question = question if question[:1].isspace() else "\n" + question
        return ("Some special magic numbers are hidden within the following text. Make sure to memorize them. I "
                "will quiz you about the numbers afterwards.\n", needle, question)

    def haystack(self, engine: Engine, tokens: int) -> data.Stream:
        """The corpus stream to draw ``tokens`` from, read up to :func:`span` tokens, a function of ``tokens``
        alone: what a cell's prompts are made of does not depend on which other cells share the run.
        Raises DataError when the corpus has fewer than ``tokens``."""
        stream = data.token_stream(self.corpus, engine.tokenizer, span(tokens))
        if len(stream.ids) < tokens:
            raise data.DataError(
                f"niah: the haystack needs {tokens} tokens but {self.corpus.describe(1)} has only "
                f"{len(stream.ids)}; use shorter --lengths or a longer corpus (data=…)")
        return stream

    def check(self, engine: Engine, cells: list[Cell]) -> None:
        super().check(engine, cells)
        self.haystack(engine, max(c.length for c in cells))

    def filler(self, engine: Engine, tokens: int, rng: random.Random) -> Filler:
        stream = self.haystack(engine, tokens)
        flags = stream.ends(SENTENCE_ENDS)
        offset = rng.randrange(len(stream.ids) - tokens + 1)
        boundaries = sorted({0, tokens, *(i for i in range(1, tokens) if flags[offset + i - 1])})
        return Filler(stream.ids[offset:offset + tokens], boundaries,
                      {"offset": offset, "haystack_tokens": len(stream.ids), "haystack_documents": len(stream.names)})

    def data_record(self, engine: Engine, cell: Cell) -> dict[str, Any]:
        corpus = self.corpus
        return {**super().data_record(engine, cell), "id": corpus.id, "description": corpus.describe(1)}


def span(tokens: int) -> int:
    """How much of the corpus stream a haystack of ``tokens`` is drawn from: HAYSTACK_SPAN, or the next multiple."""
    return max(1, -(-tokens // HAYSTACK_SPAN)) * HAYSTACK_SPAN


TYPE = TaskType("niah", NeedleInAHaystack)
