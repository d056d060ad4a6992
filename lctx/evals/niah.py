"""Needle in a haystack (``niah``): the passkey grid with a real-text haystack and a configurable needle.

The haystack is the current corpus (default: the Python reference manual; ``--data``/``--dataset`` to
change it), its documents' ids joined by a blank line, read from a seeded offset within the first
:data:`HAYSTACK_SPAN` tokens of that stream (so a cell's prompts never depend on the other cells of a run).
The needle (``--needle``, must contain ``{value}``, replaced by a seeded 7-digit number) goes to the sentence
end (a token ending in ``.``, ``!``, ``?`` or a newline) nearest to the requested depth; the question
(``--question``) follows the haystack on a new line and should end with an answer prefix so that base models
answer with the number.
Prompts, generation and scoring are those of :mod:`lctx.evals.passkey`.
"""

from __future__ import annotations

import random
from typing import Any

from lctx import data
from lctx.evals import Cell, Context, EvalOptions, TaskError, register
from lctx.evals.passkey import Filler, RetrievalTask

NEEDLE = "The special magic number is {value}."
QUESTION = "What is the special magic number? The special magic number is"
SENTENCE_ENDS = (".", "!", "?", "\n")
# Needle offsets are drawn from the first HAYSTACK_SPAN tokens of the corpus stream (a multiple of it for
# longer prompts): the whole default corpus (~113k tokens), a bounded read of a streamed dataset.
HAYSTACK_SPAN = 131_072


@register
class NeedleInAHaystack(RetrievalTask):
    name = "niah"
    description = "find a 7-digit number (--needle) hidden at a depth in real text from the corpus"
    digits = 7
    default_max_new_tokens = 12
    uses_corpus = True
    instruction = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
                   "them. I will quiz you about the numbers afterwards.\n")

    def pieces(self, options: EvalOptions) -> tuple[str, str, str]:
        needle = options.needle or NEEDLE
        question = options.question or QUESTION
        needle = needle if needle[:1].isspace() else " " + needle
        question = question if question[:1].isspace() else "\n" + question
        return self.instruction, needle, question

    def config(self, options: EvalOptions) -> dict[str, Any]:
        _, needle, question = self.pieces(options)
        return {**super().config(options), "needle": needle.strip(), "question": question.strip(),
                "data": data.open_corpus(options.data, options.dataset, options.text_field).id}

    def validate(self, options: EvalOptions) -> None:
        super().validate(options)
        if options.needle is not None and "{value}" not in options.needle:
            raise TaskError(f"--needle {options.needle!r} must contain {{value}} where the number goes, e.g. "
                            f"{NEEDLE!r}")
        try:
            (options.needle or NEEDLE).format(value=0)
        except (IndexError, KeyError, ValueError):
            raise TaskError(f"--needle {options.needle!r}: only {{value}} may appear in braces") from None

    def haystack(self, ctx: Context, tokens: int) -> tuple[list[int], list[bool], list[str]]:
        """Corpus ids to draw ``tokens`` from, per-token sentence-end flags, and the documents they come from.

        The ids are the corpus stream read up to :func:`span` tokens, a function of ``tokens`` alone: what a
        cell's prompts are made of does not depend on which other cells, shards or resumes share the run.
        Raises DataError when the corpus has fewer than ``tokens``.
        """
        wanted = span(tokens)
        cached = ctx.cache.get(("niah", wanted))
        if cached is None:
            ids, names = data.token_stream(ctx.corpus, ctx.tokenizer, wanted)
            ends = ctx.cache.setdefault("niah-sentence-ends", {})
            for i in set(ids) - ends.keys():
                ends[i] = ctx.tokenizer.decode([i]).rstrip(" ").endswith(SENTENCE_ENDS)
            cached = ctx.cache[("niah", wanted)] = (ids, [ends[i] for i in ids], names)
        ids, flags, names = cached
        if len(ids) < tokens:
            raise data.DataError(
                f"niah: the haystack needs {tokens} tokens but {ctx.corpus.describe(1)} has only {len(ids)}; "
                "use shorter --lengths or a longer corpus (--data / --dataset)"
            )
        return ids, flags, names

    def check(self, ctx: Context, cells: list[Cell]) -> None:
        super().check(ctx, cells)
        self.haystack(ctx, max(c.length for c in cells))

    def filler(self, ctx: Context, tokens: int, rng: random.Random) -> Filler:
        ids, flags, names = self.haystack(ctx, tokens)
        offset = rng.randrange(len(ids) - tokens + 1)
        boundaries = sorted({0, tokens, *(i for i in range(1, tokens) if flags[offset + i - 1])})
        return Filler(ids[offset:offset + tokens], boundaries, {"offset": offset, "haystack_tokens": len(ids),
                                                                "haystack_documents": len(names)})

    def data_record(self, ctx: Context) -> dict[str, Any]:
        return {**super().data_record(ctx), "id": ctx.corpus.id, "description": ctx.corpus.describe(1)}


def span(tokens: int) -> int:
    """How much of the corpus stream a haystack of ``tokens`` is drawn from: HAYSTACK_SPAN, or the next multiple."""
    return max(1, -(-tokens // HAYSTACK_SPAN)) * HAYSTACK_SPAN
