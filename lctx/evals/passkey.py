"""Passkey retrieval (``passkey``), and the length × depth needle grid it shares with ``niah``.

A prompt is built in token space, exactly ``L`` tokens long: the tokenizer's own prefix (BOS, if it adds one)
or, with ``chat_template=true``, the chat template's part before the user message; the instruction; filler with
the needle inserted at a depth; the question (and the template's part after the message). Each piece is
tokenized on its own and the ids are concatenated; the filler ids are trimmed so that the total is exactly
``L`` (nothing is decoded and re-encoded). The needle goes to the filler boundary (end of a filler sentence)
nearest to ``depth × filler length``: depth 0 puts it right after the instruction, depth 1 right before the
question.

Keys and filler offsets come from ``random.Random`` seeded by (task, seed, length, depth, trial), so every
variant sees identical prompts. The answer is generated greedily (:mod:`lctx.engine`); a trial is correct when
the first run of digits in the output equals the key. Each (length, depth) cell aggregates its trials: accuracy
with a Wilson 95% interval.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lctx.engine import Engine, GenerateRequest, Generation
from lctx.evals import (
    ACCURACY,
    CHAT_TEMPLATE,
    DEPTHS,
    SEED,
    Cell,
    TaskError,
    TaskType,
    max_new_tokens_param,
    samples_param,
)
from lctx.evals.filler import FILLER, nearest
from lctx.evals.generation import GenerationTask
from lctx.stats import accuracy_metrics


@dataclass
class Prompt:
    ids: list[int]
    value: str
    insert_at: int  # index of the needle's first token inside the filler
    filler_tokens: int
    needle_start: int  # index of the needle's first token in ``ids``
    needle_len: int
    filler: dict[str, Any] = field(default_factory=dict)  # where the filler came from (Filler.source)

    @property
    def depth_actual(self) -> float:
        return self.insert_at / self.filler_tokens if self.filler_tokens else 0.0


@dataclass
class Filler:
    ids: list[int]
    boundaries: list[int]  # positions in ``ids`` where the needle may go (0 and len(ids) included)
    source: dict[str, Any]


def trial_rng(task: str, seed: int, length: int, depth: float, trial: int) -> random.Random:
    return random.Random(f"{task}|{seed}|{length}|{depth:.6g}|{trial}")  # str seeds hash with sha512: stable


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


class RetrievalTask(GenerationTask):
    """A (length × depth) grid of needle prompts answered by greedy generation; subclasses give the pieces."""

    metrics = (ACCURACY,)
    figures = ("heatmap",)
    uses_depths = True
    digits: int = 5
    instruction: str = ""

    def pieces(self) -> tuple[str, str, str]:
        """(instruction, needle template with {value}, question) as text."""
        raise NotImplementedError

    def filler(self, engine: Engine, tokens: int, rng: random.Random) -> Filler:
        raise NotImplementedError

    # -- prompts --

    def fixed_ids(self, engine: Engine) -> tuple[list[int], str, list[int]]:
        """(prefix + instruction ids, needle template, question ids (+ the chat template's end))."""
        instruction, needle, question = self.pieces()
        if self.args.chat_template:
            before, after = engine.chat_wrapper()
            return before + engine.piece(instruction), needle, engine.piece(question) + after
        return engine.prefix + engine.piece(instruction), needle, engine.piece(question)

    def trial_value(self, rng: random.Random) -> str:
        """The trial's key: the first draw of its generator (the filler offset comes after)."""
        return str(rng.randint(10 ** (self.digits - 1), 10 ** self.digits - 1))

    def fixed_length(self, engine: Engine, length: int, depth: float, trial: int) -> int:
        """Tokens of a trial's prompt without filler (its key's tokenization included)."""
        head, needle, tail = self.fixed_ids(engine)
        value = self.trial_value(trial_rng(self.name, self.args.seed, length, depth, trial))
        return len(head) + len(engine.piece(needle.format(value=value))) + len(tail)

    def build_prompt(self, engine: Engine, length: int, depth: float, trial: int) -> Prompt:
        """A prompt of exactly ``length`` tokens with the needle at ``depth`` (see the module docstring)."""
        rng = trial_rng(self.name, self.args.seed, length, depth, trial)
        value = self.trial_value(rng)
        head, needle_text, tail = self.fixed_ids(engine)
        needle = engine.piece(needle_text.format(value=value))
        tokens = length - len(head) - len(needle) - len(tail)
        if tokens < 0:
            raise TaskError(f"{self.name}: length {length} is too short; the prompt without filler already has "
                            f"{length - tokens} tokens")
        filler = self.filler(engine, tokens, rng)
        assert len(filler.ids) == tokens
        at = nearest(filler.boundaries, depth * tokens)
        ids = head + filler.ids[:at] + needle + filler.ids[at:] + tail
        return Prompt(ids, value, at, tokens, len(head) + at, len(needle), filler.source)

    # -- running --

    def check(self, engine: Engine, cells: list[Cell]) -> None:
        """Every trial's prompt fits its length (keys tokenize to different lengths, so each one is checked)."""
        for cell in sorted(cells, key=lambda c: (c.length, c.depth)):
            needed = max(self.fixed_length(engine, cell.length, cell.depth, t) for t in range(self.args.samples))
            if needed > cell.length:
                raise TaskError(f"{self.name}: length {cell.length} is too short; the prompt without filler "
                                f"already has {needed} tokens")

    def requests(self, engine: Engine, cell: Cell) -> Iterator[GenerateRequest]:
        for trial in range(self.args.samples):
            prompt = self.build_prompt(engine, cell.length, cell.depth, trial)
            yield GenerateRequest(prompt.ids, self.args.max_new_tokens, engine.eos_or_pad, meta=(trial, prompt))

    def score(self, request: GenerateRequest, answer: Generation) -> dict[str, Any]:
        trial, prompt = request.meta
        found = first_number(answer.text)
        return {"trial": trial, "value": prompt.value, "output": answer.text, "answer": found,
                "correct": found == prompt.value, "prompt_tokens": len(prompt.ids), "insert_at": prompt.needle_start,
                "depth_actual": round(prompt.depth_actual, 6), "filler": prompt.filler}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return accuracy_metrics(sum(r["correct"] for r in rows), len(rows))

    def data_record(self, engine: Engine, cell: Cell) -> dict[str, Any]:
        instruction, needle, question = self.pieces()
        return {"instruction": instruction, "needle": needle, "question": question,
                "bos_added": bool(engine.prefix) and not self.args.chat_template,
                "chat_template_applied": bool(self.args.chat_template)}


class Passkey(RetrievalTask):
    description = "find a 5-digit pass key hidden at a depth in repeated filler (lengths × depths grid)"
    params = (samples_param(5, "trials per (length, depth) cell"), SEED, DEPTHS, max_new_tokens_param(8),
              CHAT_TEMPLATE)
    digits = 5

    def pieces(self) -> tuple[str, str, str]:
        return ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will "
                "quiz you about the important information there.",
                " The pass key is {value}. Remember it. {value} is the pass key.",
                "\nWhat is the pass key? The pass key is")

    def filler(self, engine: Engine, tokens: int, rng: random.Random) -> Filler:
        unit = engine.piece(" " + FILLER)
        offset = rng.randrange(len(unit))  # the filler starts at a seeded token of the repeated unit
        repeats = (offset + tokens) // len(unit) + 1
        ids = (unit * repeats)[offset:offset + tokens]
        boundaries = sorted({0, tokens, *(i for i in range(tokens) if (offset + i) % len(unit) == 0)})
        return Filler(ids, boundaries, {"offset": offset})

    def data_record(self, engine: Engine, cell: Cell) -> dict[str, Any]:
        return {**super().data_record(engine, cell), "filler": FILLER}


TYPE = TaskType("passkey", Passkey)
