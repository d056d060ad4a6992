"""RULER's prompts as its scripts build them (NVIDIA/RULER ``scripts/data/synthetic``; ``fit=ruler``, the default).

Each function below makes one cell's samples the way RULER's generator script does for one ``--max_seq_length``:
the same templates (``constants.py``, the chat template around the task and the answer prefix after it, as
``prepare.py`` joins them), the same haystack layouts, and the same random draws in the same order from
``random.Random(seed)`` and numpy's ``RandomState(seed)`` (RULER seeds both globals with ``--random_seed``, 42),
so that on the same tokenizer the prompts are RULER's, character for character. Lengths are RULER's: the
prompt's tokens (counted without the tokenizer's own BOS, as RULER's ``text_to_tokens`` does) plus the answer's
``max_new_tokens`` stay within the length; the haystack size is found by RULER's estimate and binary search,
then each sample shrinks by RULER's increment until it fits. The words and documents they draw come from
:mod:`lctx.evals.synthetic.ruler_data`.

What cannot be RULER's here: its essay haystack is Paul Graham's essays split into sentences by NLTK's punkt
model; lctx's ``haystack=corpus`` reads its corpus (``data=``) and splits sentences after ``.``, ``!`` or ``?``
followed by whitespace.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lctx.data import DataError
from lctx.evals.synthetic.ruler_data import QaData, common_words, key_words

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]
DOCUMENT = "Document {i}:\n{document}"

# constants.py: each task's template and answer prefix
TEMPLATES = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
        "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
        "for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "variable_tracking": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assigned the value {query}, they are: "),
    "common_words_extraction": (
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
        "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:"),
    "freq_words_extraction": (
        "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
        "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:"),
    "qa": (
        "Answer the question based on the given documents. Only give me the answer and do not output any other "
        "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
        "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:"),
}


class DoesNotFit(ValueError):
    """No haystack size RULER would try gives a prompt within the length."""


class RepeatedNames(ValueError):
    """variable_tracking.py fails when a chain draws a name twice (an IndexError it catches in its sample loop)."""


@dataclass
class Sample:
    """One prompt as RULER writes it: ``text`` is its ``input`` + ``answer_prefix``."""

    text: str
    answers: list[str]
    tokens: int  # RULER's count of the prompt (no BOS); the record's "length" is this + max_new_tokens
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cell:
    """What every generator needs: the seeded draws, the token counter, the length and the answer budget."""

    count: Callable[[str], int]
    length: int
    new_tokens: int
    seed: int
    template: str  # the task template (in the chat template when asked) + the answer prefix
    rng: random.Random = field(init=False)
    legacy: np.random.RandomState = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)  # random.seed(args.random_seed)
        self.legacy = np.random.RandomState(self.seed)  # np.random.seed(args.random_seed)

    def shuffled(self, items: list) -> list:
        """``random.Random(args.random_seed).shuffle(items)``: a fresh generator each time, as RULER does."""
        random.Random(self.seed).shuffle(items)
        return items


# ---- the search every RULER script runs ---------------------------------------------------------------------


def fit(cell: Cell, generate: Callable[[int], tuple[str, Any]], incremental: int, probe: int,
        estimate: Callable[[float], int], extra: int = 0) -> int:
    """RULER's haystack size: tokens per unit from a ``probe``-sized prompt, an upper bound from ``estimate``,
    then a binary search for the largest size whose prompt + ``extra`` + answer fits (``incremental`` if none)."""
    text, _ = generate(probe)
    per_unit = cell.count(text) / probe
    lower, upper = incremental, max(estimate(per_unit), incremental * 2)
    best = None
    while lower <= upper:
        middle = (lower + upper) // 2
        text, _ = generate(middle)
        if cell.count(text) + extra + cell.new_tokens <= cell.length:
            best, lower = middle, middle + 1
        else:
            upper = middle - 1
    return best if best is not None else incremental


def shrink(cell: Cell, attempt: Callable[[int], tuple[str, list[str]]], size: int, incremental: int,
           what: str, tries: int = 100_000) -> tuple[str, list[str], int, int]:
    """RULER's sample loop: generate at ``size``, less ``incremental`` at a time until prompt + answer fit; at
    ``incremental`` itself it draws again, hoping for shorter words (RULER forever; here ``tries`` times, or 500
    when none came within a fifth of the length, then DoesNotFit)."""
    shortest = None
    while True:
        try:
            text, answers = attempt(size)
        except RepeatedNames:  # RULER catches every exception here and tries again, smaller while it can be
            text, answers = "", []
        tokens = cell.count(text) if answers else cell.length
        if answers and tokens + cell.new_tokens <= cell.length:
            return text, answers, tokens, size
        if size > incremental:
            size -= incremental
            continue
        tries -= 1
        shortest = tokens if shortest is None else min(shortest, tokens)
        if tries <= 0 or (tries % 500 == 0 and shortest + cell.new_tokens > 1.2 * cell.length):
            raise DoesNotFit(f"even {size} {what} take {tokens} tokens, and {cell.new_tokens} more are kept for "
                             f"the answer: more than the length {cell.length}")


def by_estimate(cell: Cell, factor: int = 3) -> Callable[[float], int]:
    """niah.py, variable_tracking.py, qa.py: ``int((max_seq_length / tokens_per_unit) * 3)``."""
    return lambda per_unit: int((cell.length / per_unit) * factor)


# ---- haystacks ------------------------------------------------------------------------------------------------


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def essay_words(text: str) -> list[str]:
    """``re.sub(r'\\s+', " ", essay).split(" ")``."""
    return re.sub(r"\s+", " ", text).split(" ")


def essay_sentences(words: list[str], size: int, repeat: bool = True) -> list[str]:
    """The first ``size`` words (niah.py repeats the list when it is shorter; variable_tracking.py does not),
    split into sentences (lctx's rule for punkt's)."""
    if repeat and size > len(words):
        words = words * ((size + len(words) - 1) // len(words))
    text = " ".join(words[:size]).strip()
    return [s for s in SENTENCE_END.split(text) if s]


def insert_in_sentences(cell: Cell, sentences: list[str], pieces: list[str]) -> tuple[str, list[int]]:
    """niah.py's essay layout: each piece between sentences at ``int(len · depth/100)`` for depths drawn from
    the 40 DEPTHS, everything joined by spaces."""
    depths = cell.rng.sample(DEPTHS, len(pieces))
    positions = [0] + sorted(int(len(sentences) * (depth / 100)) for depth in depths) + [len(sentences)]
    parts = []
    for i in range(1, len(positions)):
        parts.append(" ".join(sentences[positions[i - 1]:positions[i]]))
        if i - 1 < len(pieces):
            parts.append(pieces[i - 1])
    return " ".join(parts), depths


# ---- niah ------------------------------------------------------------------------------------------------------


def niah(cell: Cell, args: Any, samples: int, essay: Callable[[], list[str]]) -> list[Sample]:
    """niah.py: ``keys`` keys (RULER's num_needle_k, at least ``queries``) with ``values`` values each, hidden in
    a haystack of ``args.haystack`` (corpus = RULER's essay, noise, needles); ``queries`` keys asked."""
    kinds = {"key": args.key_type, "value": args.value_type}
    keys_total = max(args.keys, args.queries)

    def draw(kind: str) -> str:
        if kind == "numbers":
            return str(cell.rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            return cell.rng.choice(key_words())
        return str(uuid.UUID(int=cell.rng.getrandbits(128), version=4))

    def generate(size: int) -> tuple[str, tuple[list[str], dict]]:
        keys, values, needles = [], [], []
        for _ in range(keys_total):
            keys.append(draw(kinds["key"]))
            value = []
            for _ in range(args.values):
                value.append(draw(kinds["value"]))
                needles.append(NEEDLE.format(type_needle_v=args.value_type, key=keys[-1], value=value[-1]))
            values.append(value)
        cell.shuffled(needles)
        info: dict[str, Any] = {"haystack_size": size}
        if args.haystack == "corpus":
            context, info["depths"] = insert_in_sentences(cell, essay_sentences(essay(), size), needles)
        else:
            if args.haystack == "noise":
                lines = [NOISE] * size
            else:
                lines = [NEEDLE.format(type_needle_v=args.value_type, key=draw(kinds["key"]),
                                       value=draw(kinds["value"])) for _ in range(size)]
            for index, needle in zip(sorted(cell.rng.sample(range(size), len(needles)), reverse=True), needles,
                                     strict=False):
                lines.insert(index, needle)
            context = "\n".join(lines)
        asked = cell.rng.sample(range(keys_total), args.queries)
        queries = [keys[i] for i in asked]
        answers = [a for i in asked for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, kind = cell.template, args.value_type
        if args.queries * args.values == 1:  # RULER's singular wording, replaced over the whole template
            template = (template.replace("Some", "A").replace("are all", "is").replace("are", "is")
                        .replace("answers", "answer"))
            kind = kind[:-1]
        info["query_keys"] = queries
        return template.format(type_needle_v=kind, context=context, query=query), (answers, info)

    incremental = 500 if args.haystack == "corpus" else 25
    if args.haystack != "corpus" and cell.length < 4096:
        incremental = 5
    size = fit(cell, generate, incremental, incremental, by_estimate(cell))
    out = []
    for _ in range(samples):
        text, (answers, info), tokens, _ = shrink(cell, generate, size, incremental, "haystack units")
        out.append(Sample(text, answers, tokens, info))
    return out


# ---- variable tracking ----------------------------------------------------------------------------------------


def variable_tracking(cell: Cell, args: Any, samples: int, bare: str, essay: Callable[[], list[str]]) -> list[Sample]:
    """variable_tracking.py: one chain of ``hops`` + 1 assignments (``VAR B = VAR A ``, one per line among the
    noise lines), after a worked example built the same way at 500 tokens (3-letter names, value 12345) whose
    names and value are drawn again for every sample. ``bare`` is the template without a chat template."""
    hops = args.hops

    def chains(icl: bool) -> tuple[list[str], list[str]]:
        letters, count = (3, min(10, hops)) if icl else (5, hops)
        names = ["".join(cell.rng.choices(string.ascii_uppercase, k=letters)) for _ in range(count + 1)]
        repeated = len(set(names)) < count + 1
        while len(set(names)) < count + 1:
            names.append("".join(cell.rng.choices(string.ascii_uppercase, k=letters)))
        value = "12345" if icl else str(cell.legacy.randint(10000, 99999))
        if repeated:  # RULER starts a second chain from the extra names (a value drawn) and fails on it
            if not icl:
                cell.legacy.randint(10000, 99999)
            raise RepeatedNames("a chain drew a name twice")
        return names, [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(count)]

    def generate(size: int, icl: bool) -> tuple[str, list[str]]:
        names, chain = chains(icl)
        value = chain[0].split("=")[-1].strip()
        if args.haystack == "corpus":
            text, _ = insert_in_sentences(cell, essay_sentences(essay(), size, repeat=False),
                                          [s.strip() + "." for s in interleave(cell, [chain])])
        else:
            lines = [NOISE] * size
            positions = sorted(cell.rng.sample(range(len(lines)), len(chain)))
            for j, position in enumerate(positions):
                lines.insert(position + j, chain[j])
            text = "\n".join(lines)
        text = text.replace(". \n", ".\n")
        template = bare if icl else cell.template
        return template.format(context=text, query=value, num_v=(min(10, hops) if icl else hops) + 1), names

    # the worked example: a run of its own at 500 tokens, nothing kept for an answer
    example_cell = Cell(cell.count, 500, 0, cell.seed, bare)
    example_cell.rng, example_cell.legacy = cell.rng, cell.legacy  # the same draws continue
    size = fit(example_cell, lambda n: generate(n, True), 5, 5, by_estimate(example_cell))
    text, names, _, _ = shrink(example_cell, lambda n: generate(n, True), size, 5, "noise lines")
    example = text + " " + " ".join(names) + "\n"

    def randomized() -> str:
        out = example
        for name in example.strip().split()[-hops - 1:]:
            out = out.replace(name, "".join(cell.rng.choices(string.ascii_uppercase, k=len(name))))
        return out.replace("12345", str(cell.legacy.randint(10000, 99999)))

    def attempt(size: int) -> tuple[str, list[str]]:
        text, names = generate(size, False)
        cutoff = text.index(TEMPLATES["variable_tracking"][0][:20])  # after the chat template's head, if any
        return text[:cutoff] + randomized() + "\n" + text[cutoff:], names

    incremental = 500 if args.haystack == "corpus" else 10
    if args.haystack != "corpus" and cell.length < 4096:
        incremental = 5
    size = fit(cell, lambda n: generate(n, False), incremental, incremental, by_estimate(cell),
               extra=cell.count(example))
    out = []
    for _ in range(samples):
        text, names, tokens, used = shrink(cell, attempt, size, incremental, "noise lines")
        out.append(Sample(text, names, tokens, {"haystack_size": used}))
    return out


def interleave(cell: Cell, chains: list[list[str]]) -> list[str]:
    """variable_tracking.py's ``shuffle_sublists_heap``: the chains' statements merged in a random order that
    keeps each chain's own order (a heap keyed by ``random.random()``)."""
    import heapq

    heap = [(cell.rng.random(), i, 0) for i in range(len(chains))]
    heapq.heapify(heap)
    out = []
    while heap:
        _, chain, position = heapq.heappop(heap)
        out.append(chains[chain][position])
        if position + 1 < len(chains[chain]):
            heapq.heappush(heap, (cell.rng.random(), chain, position + 1))
    return out


# ---- common words ---------------------------------------------------------------------------------------------


def common_words_task(cell: Cell, args: Any, samples: int, english: Callable[[], list[str]]) -> list[Sample]:
    """common_words_extraction.py: a numbered list ("1. word 2. word …") in which ``common`` words repeat often
    (30×, below 4096 tokens 6×) and the rest rarely (3×, 1×), after one worked example of 40 words (20)."""
    words = common_words(cell.seed)

    def example(size: int, often: int, rarely: int) -> tuple[str, list[str]]:
        chosen = cell.rng.sample(words if size <= len(words) else english(), size)
        common, rare = chosen[:args.common], chosen[args.common:]
        listed = cell.shuffled(common * often + rare * rarely)
        return " ".join(f"{i + 1}. {word}" for i, word in enumerate(listed)), common

    def generate(size: int) -> tuple[str, list[str]]:
        small = cell.length < 4096
        shot, shot_answer = example(20, 3, 1) if small else example(40, 10, 3)
        context, answers = example(size, 6, 1) if small else example(size, 30, 3)  # synthetic.yaml's cwe
        shot = (cell.template.format(num_cw=args.common, context=shot, query="") + " "
                + " ".join(f"{i + 1}. {word}" for i, word in enumerate(shot_answer)))
        return shot + "\n" + cell.template.format(num_cw=args.common, context=context, query=""), answers

    size = fit(cell, generate, 10, 4096, lambda per_word: int(cell.length // per_word) * 2)
    out = []
    for _ in range(samples):
        text, answers, tokens, used = shrink(cell, generate, size, 10, "words")
        out.append(Sample(text, answers, tokens, {"words": used}))
    return out


# ---- frequent words -------------------------------------------------------------------------------------------


def zeta(alpha: float, terms: int = 64) -> float:
    """Riemann ζ(α), α > 1, to the last bit of a float64: a correctly rounded partial sum and the Euler–Maclaurin
    tail with Bernoulli terms up to B8: scipy.special.zeta's value (which RULER divides by) at RULER's α = 2, and
    within a unit in the last place of it elsewhere."""
    n = terms
    tail = (n ** (1 - alpha) / (alpha - 1) - n ** -alpha / 2 + alpha * n ** (-alpha - 1) / 12
            - alpha * (alpha + 1) * (alpha + 2) * n ** (-alpha - 3) / 720
            + alpha * (alpha + 1) * (alpha + 2) * (alpha + 3) * (alpha + 4) * n ** (-alpha - 5) / 30240
            - math.prod(alpha + i for i in range(7)) * n ** (-alpha - 7) / 1209600)
    return math.fsum([*(k ** -alpha for k in range(1, n)), n ** -alpha, tail])


def frequent_words(cell: Cell, args: Any, samples: int) -> list[Sample]:
    """freq_words_extraction.py: a vocabulary of (length − max_new_tokens) // 50 coded words, the first replaced
    by "...", repeated ⌊N·k^-α/ζ(α)⌋ times; the prompt grows by (length − max_new_tokens) // 32 words while it is
    under the length (then one step back), and each sample shrinks by that much until it fits."""
    limit = cell.length - cell.new_tokens
    size, incremental = limit // 50, limit // 32
    z = zeta(args.alpha)

    def vocabulary() -> list[str]:
        vocab = ["".join(cell.rng.choices(string.ascii_lowercase, k=args.letters)) for _ in range(size)]
        while len(set(vocab)) < size:
            vocab.append("".join(cell.rng.choices(string.ascii_lowercase, k=args.letters)))
        vocab = cell.shuffled(sorted(set(vocab)))
        vocab[0] = "..."  # the most frequent "word" is noise
        return vocab

    def text(vocab: list[str], words: int) -> str:
        counts = (words * (np.arange(1, len(vocab) + 1) ** -args.alpha) / z).astype(int)  # numpy, as RULER
        listed = cell.shuffled([w for w, n in zip(vocab, counts, strict=True) for _ in range(n)])
        return cell.template.format(context=" ".join(listed), query="")

    vocab, words = vocabulary(), limit // args.letters
    while cell.count(text(vocab, words)) < limit:
        words += incremental
    words -= incremental
    out = []
    for _ in range(samples):
        vocab, used = vocabulary(), words
        prompt = text(vocab, used)
        while cell.count(prompt) > limit:
            used -= incremental
            prompt = text(vocab, used)
        out.append(Sample(prompt, vocab[1:4], cell.count(prompt), {"words": used, "vocabulary": len(vocab)}))
    return out


# ---- QA ----------------------------------------------------------------------------------------------------------


def qa(cell: Cell, data: QaData, samples: int) -> list[Sample]:
    """qa.py: sample i asks question i among its own documents and others drawn at random, shuffled, numbered."""
    docs = data.documents

    def generate(index: int, size: int) -> tuple[str, list[str]]:
        question = data.questions[index]
        own, more = question["context"], question.get("more_context", [])
        if size < len(docs):
            if size - len(own) > len(more):
                rest = [i for i in range(len(docs)) if i not in own + more]
                chosen = own + more + cell.rng.sample(rest, max(0, size - len(own) - len(more)))
            else:
                chosen = own + cell.rng.sample(more, size - len(own))
            texts = [docs[i] for i in chosen]
        else:
            texts = (docs * ((size + len(docs) - 1) // len(docs)))[:size]
        cell.shuffled(texts)
        context = "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(texts))
        return cell.template.format(context=context, query=question["query"]), question["outputs"]

    if samples > len(data.questions):
        raise DataError(f"the QA data has {len(data.questions)} questions; samples={samples} asks for more")
    size = fit(cell, lambda n: generate(0, n), 10, 10, by_estimate(cell))
    out = []
    for index in range(samples):
        text, answers, tokens, used = shrink(cell, lambda n, i=index: generate(i, n), size, 10, "documents")
        out.append(Sample(text, answers, tokens, {"documents": used, "question": data.questions[index]["query"]}))
    return out
