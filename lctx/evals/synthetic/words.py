"""RULER's aggregation tasks: the most repeated words of a word list (cwe), the most frequent coded words (fwe)."""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from typing import Any

from lctx import data
from lctx.engine import Engine
from lctx.evals import max_new_tokens_param
from lctx.evals.filler import FILLER
from lctx.evals.synthetic import ruler as generators
from lctx.evals.synthetic import ruler_data
from lctx.evals.synthetic.base import COMMON, Body, DataNeeded, SyntheticTask, noise_pad, tail_of
from lctx.spec import Param

WORD = re.compile(r"(?<![^\s(\"])[a-z]{3,12}(?=[\s.,;:!?)])")  # a lowercase word between spaces/punctuation
NOISE_WORDS = set(re.findall(r"[a-z]+", FILLER.lower()))
VOCABULARY_CHARS = 2_000_000  # the corpus text read for the word list; a fixed amount keeps the list fixed


class CommonWords(SyntheticTask):
    """RULER's cwe: a numbered list where the common words repeat often (30×; 6× below 4k) and the rest rarely
    (3×; 1×). ``fit=ruler``: RULER's words (wonderwords' lists, shuffled by the seed; its english_words.json from
    ``data_dir`` past them) and list ("1. word 2. word"); ``fit=exact``: lctx's, the words from the corpus."""

    description = "RULER common words: the most repeated words of a numbered word list"
    params = (*COMMON, max_new_tokens_param(120), Param("common", int, 10, "words repeated often (asked)", ge=1),
              Param("data_dir", str, None, "directory holding RULER's english_words.json, which fit=ruler needs at "
                    "lengths past wonderwords' ~8.2k words", identity=False))
    template = "common_words_extraction"

    @property
    def reads_corpus(self) -> bool:
        return self.exact

    def ruler_samples(self, engine: Engine, cell: generators.Cell) -> list[generators.Sample]:
        return generators.common_words_task(cell, self.args, self.args.samples,
                                            lambda: ruler_data.english_words(self.args.data_dir))

    def data_record(self, engine: Engine, cell) -> dict[str, Any]:
        record = super().data_record(engine, cell)
        if not self.exact:
            record["word_lists"] = ruler_data.word_lists()
        return record

    def repeats(self, length: int) -> tuple[int, int]:
        return (6, 1) if length < 4096 else (30, 3)  # RULER's settings below and from 4096 tokens

    @functools.cached_property
    def vocabulary(self) -> list[str]:
        """The corpus's lowercase words (3–12 letters) seen at least twice, noise words excluded, sorted."""
        counts: Counter[str] = Counter()
        read = 0
        for doc in self.corpus.documents(1):
            counts.update(WORD.findall(doc.text))
            read += len(doc.text)
            if read >= VOCABULARY_CHARS:
                break
        return sorted(w for w, n in counts.items() if n >= 2 and w not in NOISE_WORDS)

    def numbered(self, engine: Engine, words: list[str]) -> list[int]:
        items = engine.pieces([f" {i + 1}." for i in range(len(words))])
        spelled = engine.pieces([" " + w for w in words])
        return [i for number, word in zip(items, spelled, strict=True) for i in number + word]

    def plan(self, engine: Engine, rng: random.Random, length: int) -> dict[str, Any]:
        vocabulary = self.vocabulary
        order = rng.sample(vocabulary, len(vocabulary))
        size = 20 if length < 4096 else 40  # the worked example's words, from the far end of the order
        return {"_order": order, "_length": length, "_example": order[-size:], "answers": order[:self.args.common]}

    def body(self, plan: dict[str, Any]) -> Body:
        n = self.args.common
        return Body("Below is a numbered list of words. In these words, some appear more often than others. "
                    "Memorize the ones that appear most often.\n",
                    f"\nQuestion: What are the {n} most common words in the above list?",
                    f" Answer: The top {n} words that appear most often in the list are:")

    def context(self, engine: Engine, plan: dict[str, Any], budget: int, rng: random.Random) -> list[int]:
        often, rarely = self.repeats(plan["_length"])
        n = self.args.common
        example = set(plan["_example"])
        pool = [w for w in plan["_order"] if w not in example]
        common, rare = pool[:n], pool[n:]
        costs = dict(zip(pool, map(len, engine.pieces([" " + w for w in pool])), strict=True))
        items = n * often
        total = often * sum(costs[w] for w in common) + self.number_cost(engine, 0, items)
        if total > budget:
            raise DataNeeded(f"{self.name}: the {n} common words repeated {often}× take {total} tokens, more than "
                             f"the {budget} the context has at this length; use longer --lengths")
        used = 0
        while used < len(rare):
            more = rarely * costs[rare[used]] + self.number_cost(engine, items, items + rarely)
            if total + more > budget:
                break
            total, items, used = total + more, items + rarely, used + 1
        else:
            raise data.DataError(f"{self.name}: the corpus has only {len(pool)} distinct words, too few to fill "
                                 f"{budget} tokens; use shorter --lengths or a corpus with more words (data=…)")
        words = common * often + rare[:used] * rarely
        rng.shuffle(words)
        plan.update(rare_words=used, repeats=[often, rarely])
        return noise_pad(engine, budget - total) + self.numbered(engine, words)

    def number_cost(self, engine: Engine, start: int, stop: int) -> int:
        """Tokens of the item numbers ``start+1 … stop`` (``" 12."``)."""
        return sum(map(len, engine.pieces([f" {i + 1}." for i in range(start, stop)])))

    def example(self, engine: Engine, plan: dict[str, Any], length: int, rng: random.Random) -> list[int]:
        """RULER's worked example: 20 words (10 common ×3, 10 rare ×1; from 4096 tokens 40 words, ×10 / ×3)."""
        often, rarely = (3, 1) if length < 4096 else (10, 3)
        words = plan["_example"]
        common, rare = words[:self.args.common], words[self.args.common:]
        listed = common * often + rare * rarely
        rng.shuffle(listed)
        text = self.body(plan)
        answer = " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(common))
        return (engine.piece(text.instruction) + self.numbered(engine, listed) + engine.piece(text.question)
                + engine.piece(text.answer_prefix) + engine.piece(answer) + engine.piece("\n"))


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann ζ(α) for α > 1: a partial sum plus its Euler–Maclaurin tail (error far below 1e-9)."""
    partial = sum(k ** -alpha for k in range(1, terms))
    return partial + terms ** (1 - alpha) / (alpha - 1) + terms ** -alpha / 2


class FrequentWords(SyntheticTask):
    """RULER's fwe: coded words with Zipf counts ⌊N·k^-α/ζ(α)⌋; rank 1 is the noise word ``...``. ``fit=ruler``:
    RULER's vocabulary of (length − max_new_tokens) // 50 words; ``fit=exact``: lctx's, length // 50."""

    description = "RULER frequent words: the 3 most frequent coded words of Zipf-distributed text"
    template = "freq_words_extraction"
    params = (*COMMON, max_new_tokens_param(50),
              Param("alpha", float, 2.0, "Zipf exponent of the word counts", gt=1),
              Param("letters", int, 6, "letters per coded word", ge=2))

    def ruler_samples(self, engine: Engine, cell: generators.Cell) -> list[generators.Sample]:
        return generators.frequent_words(cell, self.args, self.args.samples)

    def plan(self, engine: Engine, rng: random.Random, length: int) -> dict[str, Any]:
        size = max(length // 50, 5)  # RULER: vocabulary of max_seq_length // 50 coded words
        vocab: set[str] = set()
        while len(vocab) < size:
            vocab.add("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=self.args.letters)))
        words = sorted(vocab)
        rng.shuffle(words)
        words[0] = "..."  # the most frequent "word" is noise
        return {"_vocabulary": words, "answers": words[1:4]}

    def body(self, plan: dict[str, Any]) -> Body:
        return Body("Read the following coded text and track the frequency of each coded word. Find the three most "
                    "frequently appeared coded words.",
                    "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                    "most frequently appeared words in the above coded text?",
                    " Answer: According to the coded text above, the three most frequently appeared words are:")

    def counts(self, words: int, size: int) -> list[int]:
        norm = zeta(self.args.alpha)
        return [int(words * k ** -self.args.alpha / norm) for k in range(1, size + 1)]

    def context(self, engine: Engine, plan: dict[str, Any], budget: int, rng: random.Random) -> list[int]:
        vocab = plan["_vocabulary"]
        costs = list(map(len, engine.pieces([" " + w for w in vocab])))

        def total(words: int) -> int:
            return sum(c * n for c, n in zip(costs, self.counts(words, len(vocab)), strict=True))

        high = 1
        while total(high) <= budget:
            high *= 2
        low = high // 2  # total(low) <= budget < total(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if total(middle) <= budget else (low, middle)
        counts = self.counts(low, len(vocab))
        if len(counts) > 4 and not min(counts[1:4]) > max(counts[4:]):
            raise DataNeeded(f"{self.name}: at this length the three most frequent coded words are not unique "
                             f"(counts {counts[:6]}); use longer --lengths")
        text = [w for w, n in zip(vocab, counts, strict=True) for _ in range(n)]
        rng.shuffle(text)
        plan.update(words=low, top_counts=counts[:4])
        ids = [i for w in text for i in engine.piece(" " + w)]
        return tail_of(engine.piece(" ..."), budget - len(ids)) + ids  # more of the noise word keeps the answer
