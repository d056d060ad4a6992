"""RULER-style synthetic tasks (``synthetic:<task>``) built at exact token lengths, and RULER's effective length.

The tasks follow RULER (Hsieh et al. 2024, arXiv:2404.06654; NVIDIA/RULER ``scripts/data/synthetic``): the
same needles, templates, answer prefixes, complexity settings and scoring, but every prompt is assembled in
token space and is **exactly** the cell's length (RULER stops at "at most"). Pieces are tokenized on their own
and their ids concatenated, as in :mod:`lctx.evals.passkey`: the tokenizer's prefix (BOS) or, with
``--chat-template``, the chat template's user turn around the task; the instruction; the context, exactly as
many tokens as remain; the question; the answer prefix.

=====================  ======================================================================================
member                 RULER task · what the model must return
=====================  ======================================================================================
``niah-single``        niah_single_2: one "word-word" key, one 7-digit number, hidden in the haystack
``niah-uuid``          niah_single_3: as niah-single with a UUID value
``niah-multikey``      niah_multikey_1: four keys with one number each; one key is asked
``niah-multivalue``    niah_multivalue: one key with four numbers; all four are asked
``niah-multiquery``    niah_multiquery: four keys with one number each; all four are asked
``kv-retrieval``       niah_multikey_3: UUID key → UUID value, the haystack made of distractor key–value needles
``variable-tracking``  vt: a chain ``VAR A = 12345``, ``VAR B = VAR A``, … (4 hops); every name holding the value
``common-words``       cwe: the 10 words repeated most in a numbered word list
``frequent-words``     fwe: the 3 most frequent coded words in Zipf(α=2)-distributed text
=====================  ======================================================================================

``all`` runs every member; ``cwe`` and ``fwe`` are aliases. The haystack of the niah tasks and of
variable-tracking is the current corpus (``--data``/``--dataset``, default the Python reference manual; RULER's
"essay") or RULER's "noise" sentences (``The grass is green. …``): ``--task-arg haystack=corpus|noise|needles``
(``needles``: distractor needles, RULER's multikey-2/3 haystack). Defaults: corpus for niah, noise for
variable-tracking, as in RULER; kv-retrieval is always a needle haystack. A haystack window starts at a
sentence start (corpus windows within the first SPAN tokens of the corpus stream, so a cell's prompts never
depend on the other cells of a run), and needles go to the sentence end (``.``, ``!``, ``?`` or a newline
followed by whitespace) nearest a depth drawn from RULER's 40 evenly spaced depths (variable-tracking:
uniform random depths, in chain order). List contexts (kv-retrieval and ``haystack=needles``, common-words,
frequent-words) hold as many whole items as fit; the remaining tokens (fewer than one item) are the end of
the noise text (frequent-words: RULER's ``...`` noise word) placed before the list, so the answer never
changes. Keys are adjective–noun pairs from a fixed list (RULER draws them with ``wonderwords``);
common-words draws its words from the corpus's lowercase words seen at least twice and, like
variable-tracking, starts with RULER's worked example (a smaller instance of the task, answered).

Keys, values, word choices, depths and offsets come from ``random.Random`` seeded by (task, --seed, length,
trial), so every RoPE variant sees identical prompts. The prompt is the cell's length; the answer is generated
after it, greedily with the KV cache (:func:`lctx.evals.passkey.greedy`) up to RULER's token budgets (niah/kv
128, vt 30, cwe 120, fwe 50; ``--max-new-tokens`` overrides), with length-dependent variants scaled once for
prompt + answer. Scoring is RULER's
``string_match_all``: a trial scores the fraction of its answers found, case-insensitively, in the output.
Each length records ``score`` (mean over trials, a fraction; RULER reports 100×) and ``accuracy`` (trials
with every answer found) with a Wilson 95% interval.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import random
import re
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lctx import data
from lctx.evals import (
    Cell,
    Context,
    EvalOptions,
    Outcome,
    Report,
    Task,
    TaskError,
    forward_cost,
    register_family,
)
from lctx.evals.passkey import FILLER, accuracy_metrics, answering, chat_wrapper, nearest
from lctx.patches import RopeSpec

PREFIX = "synthetic"
DEFAULT_THRESHOLD = 85.6  # RULER: Llama-2-7B's average score at 4k, in percent
HAYSTACKS = ("corpus", "noise", "needles")
DEPTHS = [round(100 * i / 39) / 100 for i in range(40)]  # RULER: 40 evenly spaced depths in [0, 1]
SENTENCE_ENDS = (".", "!", "?", "\n")
SPAN = 131_072  # corpus haystack windows come from the stream's first SPAN tokens (the default corpus: all of it)

# RULER draws keys as adjective-noun pairs (wonderwords); a fixed list keeps lctx free of that dependency.
ADJECTIVES = (
    "amber ancient bitter brave brisk calm clever crimson curious dusty eager early fancy fierce gentle golden "
    "grumpy hollow humble icy jolly keen lazy lively loud lucky mellow misty noble odd pale plain proud quiet "
    "rapid rusty shiny silent sleepy smooth sour spicy steady stormy sunny swift tame tender tidy vivid warm wild"
).split()
NOUNS = (
    "anchor apple badger banjo basket beacon bicycle blanket bottle bucket cactus camera candle canyon carpet "
    "castle cello comet cookie crayon dolphin drum eagle engine falcon feather fiddle garden glacier hammer "
    "harbor helmet island jacket kettle ladder lantern lemon magnet meadow mirror needle orchard otter pebble "
    "pepper piano pillow pirate planet pumpkin rabbit ribbon river rocket saddle sandal shovel spoon tiger "
    "tulip turtle violin wagon walnut whistle"
).split()


class DataNeeded(TaskError):
    """A prompt that does not fit the requested length (a TaskError: the command asks for too short a length)."""


# ---- scoring ----------------------------------------------------------------------------------------------


def string_match_all(output: str, answers: list[str]) -> list[bool]:
    """RULER's ``string_match_all`` per answer: is it a case-insensitive substring of the output?"""
    low = output.lower()
    return [answer.lower() in low for answer in answers]


def cell_metrics(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """``score`` (mean fraction of answers found) and the all-answers accuracy with its Wilson interval."""
    correct = sum(bool(t["correct"]) for t in trials)
    score = sum(t["score"] for t in trials) / len(trials) if trials else None
    return {"score": score, **accuracy_metrics(correct, len(trials))}


# ---- token-space pieces -------------------------------------------------------------------------------------


class Encoder:
    """Token ids of text pieces without special tokens, cached per tokenizer (pieces repeat thousands of times)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = data.encode(self.tokenizer, text, special=False)
        return self._cache[text]

    def many(self, texts: Iterable[str]) -> list[list[int]]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            encoded = self.tokenizer(missing, add_special_tokens=False, verbose=False)["input_ids"]
            self._cache.update(zip(missing, map(list, encoded), strict=True))
        return [self._cache[t] for t in texts]

    def fresh(self, texts: list[str]) -> list[list[int]]:
        """Ids of pieces that will not come again, tokenized together and not cached."""
        return list(map(list, self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]))

    def boundaries(self, ids: list[int]) -> list[bool]:
        """Per token: may an insertion follow it? Yes after ., !, ? or a newline, when whitespace comes next."""
        texts = {i: self.tokenizer.decode([i]) for i in set(ids)}
        ends = {i: t.rstrip(" ").endswith(SENTENCE_ENDS) for i, t in texts.items()}
        spaced = {i: t[:1].isspace() for i, t in texts.items()}
        after = ids[1:] + ids[:1]  # the noise text repeats, so its last token is followed by its first
        return [ends[i] and spaced[j] for i, j in zip(ids, after, strict=True)]


def encoder(ctx: Context) -> Encoder:
    found = ctx.cache.get("synthetic:encoder")
    if found is None or found.tokenizer is not ctx.tokenizer:
        found = ctx.cache["synthetic:encoder"] = Encoder(ctx.tokenizer)
    return found


def tail_of(unit: list[int], tokens: int) -> list[int]:
    """The last ``tokens`` ids of ``unit`` repeated: padding that reads like the end of a longer text."""
    if tokens <= 0:
        return []
    repeated = unit * (tokens // len(unit) + 1)
    return repeated[len(repeated) - tokens:]


def noise_pad(enc: Encoder, tokens: int) -> list[int]:
    """``tokens`` ids ending RULER's noise text, then a newline."""
    return tail_of(enc(" " + FILLER) + enc("\n"), tokens)


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


def noise_haystack(enc: Encoder) -> Haystack:
    unit = enc(" " + FILLER)
    return Haystack(unit, enc.boundaries(unit), True, "noise")


def corpus_haystack(ctx: Context, tokens: int) -> Haystack:
    """The corpus's documents joined by blank lines, read up to a span that depends on ``tokens`` alone.

    Windows are drawn from the first SPAN tokens of the stream (the next multiple of it for longer windows), so
    a cell's prompts never depend on which other cells, shards or resumes share the run. DataError when the
    corpus has fewer than ``tokens``.
    """
    wanted = -(-max(tokens, 1) // SPAN) * SPAN
    haystack = ctx.cache.get(("synthetic:corpus", wanted))
    if haystack is None:
        ids, _ = data.token_stream(ctx.corpus, ctx.tokenizer, wanted)
        ids = ids[:wanted]
        haystack = ctx.cache[("synthetic:corpus", wanted)] = Haystack(ids, encoder(ctx).boundaries(ids), False,
                                                                       ctx.corpus.id)
    if len(haystack.ids) < tokens:
        raise data.DataError(f"synthetic: the haystack needs {tokens} tokens but {ctx.corpus.describe(1)} has "
                             f"only {len(haystack.ids)}; use shorter --lengths, a longer corpus (--data / "
                             "--dataset) or --task-arg haystack=noise")
    return haystack


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


def insert(ids: list[int], boundaries: list[int], pieces: list[tuple[float, list[int]]]) -> list[int]:
    """``ids`` with each piece inserted at the boundary nearest its depth, in the order given."""
    at = [nearest(boundaries, depth * len(ids)) for depth, _ in pieces]
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


class SyntheticTask(Task):
    """One RULER task; subclasses say what one trial's question and context are."""

    metric = "score"
    higher_is_better = True
    uses_corpus = True  # the corpus is opened lazily: tasks that do not read it (reads_corpus) cost nothing
    default_samples = 5
    default_max_new_tokens = 128
    member: str = ""
    ruler: str = ""  # the RULER task this member follows
    default_haystack: str | None = None  # tasks with a configurable haystack

    def __init__(self) -> None:
        self.name = f"{PREFIX}:{self.member}"

    # -- options --

    def haystack_kind(self, options: EvalOptions) -> str | None:
        if self.default_haystack is None:
            return None
        return options.task_args.get("haystack", self.default_haystack)

    def max_new_tokens(self, options: EvalOptions) -> int:
        return options.max_new_tokens or self.default_max_new_tokens

    def reads_corpus(self, options: EvalOptions) -> bool:
        return self.haystack_kind(options) == "corpus"

    def config(self, options: EvalOptions) -> dict[str, Any]:
        config = {"samples": self.samples(options), "seed": options.seed,
                  "max_new_tokens": self.max_new_tokens(options), "chat_template": options.chat_template}
        if self.haystack_kind(options) is not None:
            config["haystack"] = self.haystack_kind(options)
        if self.reads_corpus(options):
            config["data"] = data.open_corpus(options.data, options.dataset, options.text_field).id
        return config

    def validate(self, options: EvalOptions) -> None:
        threshold_of(options)
        kind = options.task_args.get("haystack")
        if kind is not None and kind not in HAYSTACKS:
            raise TaskError(f"--task-arg haystack={kind!r} is not a haystack; choose one of {', '.join(HAYSTACKS)}")
        if options.max_new_tokens is not None and options.max_new_tokens < 1:
            raise TaskError(f"--max-new-tokens {options.max_new_tokens} must be at least 1")

    def cost(self, cells: list[Cell], options: EvalOptions) -> float:
        return sum(forward_cost(c.length) for c in cells) * self.samples(options)

    # -- building --

    def body(self, plan: dict[str, Any]) -> Body:
        raise NotImplementedError

    def plan(self, ctx: Context, rng: random.Random, length: int) -> dict[str, Any]:
        """Everything random about a trial that the question needs (keys, values, names) and its ``answers``.

        Keys starting with ``_`` are working state; the others (and what :meth:`context` adds) are recorded
        with the trial.
        """
        raise NotImplementedError

    def context(self, ctx: Context, plan: dict[str, Any], budget: int, rng: random.Random) -> list[int]:
        """Exactly ``budget`` context ids for the plan."""
        raise NotImplementedError

    def example(self, ctx: Context, plan: dict[str, Any], length: int, rng: random.Random) -> list[int]:
        """RULER's worked example placed before the task (variable-tracking, common-words); [] otherwise."""
        return []

    def assemble(self, ctx: Context, plan: dict[str, Any], length: int, rng: random.Random,
                 example: list[int], chat: bool) -> list[int]:
        """Prefix + example + instruction + context + question + answer prefix, exactly ``length`` ids."""
        enc = encoder(ctx)
        text = self.body(plan)
        if chat:
            head, tail = chat_wrapper(ctx.tokenizer)
            after = enc(text.question) + tail + enc(text.answer_prefix.lstrip())
        else:
            head, after = data.special_prefix(ctx.tokenizer), enc(text.question) + enc(text.answer_prefix)
        before = head + example + enc(text.instruction)
        budget = length - len(before) - len(after)
        if budget < 1:
            raise DataNeeded(f"{self.name}: length {length} is too short; the prompt without its context already "
                             f"has {len(before) + len(after)} tokens")
        ids = before + self.context(ctx, plan, budget, rng) + after
        assert len(ids) == length, (self.name, len(ids), length)
        return ids

    def build(self, ctx: Context, length: int, trial: int) -> Prompt:
        """The trial's prompt; identical for every model with this tokenizer, corpus, seed and options."""
        rng = random.Random(f"{self.name}|{ctx.options.seed}|{length}|{trial}")  # str seeds are stable
        plan = self.plan(ctx, rng, length)
        example = self.example(ctx, plan, length, rng)
        ids = self.assemble(ctx, plan, length, rng, example, ctx.options.chat_template)
        return Prompt(ids, plan["answers"], {k: v for k, v in plan.items() if k != "answers" and k[0] != "_"})

    # -- running --

    def check(self, ctx: Context, cells: list[Cell]) -> None:
        """Build every trial at the shortest length (too short?) and one at the longest (corpus too small?)."""
        lengths = sorted({c.length for c in cells})
        for trial in range(self.samples(ctx.options)):
            self.build(ctx, lengths[0], trial)
        self.build(ctx, lengths[-1], 0)

    def run(self, ctx: Context, spec: RopeSpec, cells: list[Cell], report: Report) -> dict[Cell, Outcome]:
        options = ctx.options
        outcomes = {}
        for cell in cells:
            trials = []
            with answering(ctx, spec, cell.length, self.max_new_tokens(options)) as answer_to:
                for trial in range(self.samples(options)):
                    prompt = self.build(ctx, cell.length, trial)
                    output = answer_to(prompt.ids)
                    found = string_match_all(output, prompt.answers)
                    trials.append({"trial": trial, "answers": prompt.answers, "output": output, "found": found,
                                   "score": sum(found) / len(found), "correct": all(found),
                                   "prompt_tokens": len(prompt.ids), **prompt.info})
                    report(forward_cost(cell.length))
            outcomes[cell] = Outcome(metrics=cell_metrics(trials), samples=trials, data=self.data_record(ctx))
        return outcomes

    def data_record(self, ctx: Context) -> dict[str, Any]:
        kind = self.haystack_kind(ctx.options)
        record = {"ruler_task": self.ruler, "threshold": threshold_of(ctx.options),
                  "bos_added": bool(data.special_prefix(ctx.tokenizer)), "chat_template": ctx.options.chat_template}
        if kind is not None:
            record["haystack"] = kind
        if self.reads_corpus(ctx.options):
            record["corpus"] = ctx.corpus.id
            record["corpus_description"] = ctx.corpus.describe(1)
        return record


def threshold_of(options: EvalOptions) -> float:
    """``--task-arg threshold=…`` (percent, as RULER states it), default 85.6."""
    raw = options.task_args.get("threshold")
    if raw is None:
        return DEFAULT_THRESHOLD
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= 100:
        raise TaskError(f"--task-arg threshold={raw!r} must be a score in percent, in (0, 100] (RULER uses 85.6)")
    return value


# ---- needle in a haystack (niah-*, kv-retrieval) ------------------------------------------------------------


def word_key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in taken:
            return key


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class Needles(SyntheticTask):
    """RULER's niah: keys with values hidden as ``One of the special magic {values} for {key} is: {value}.``"""

    key_type = "words"  # words | uuids
    value_type = "numbers"  # numbers | uuids
    keys = 1
    values = 1
    queries = 1
    default_haystack = "corpus"
    default_max_new_tokens = 128

    def new_key(self, rng: random.Random, taken: set[str]) -> str:
        return word_key(rng, taken) if self.key_type == "words" else random_uuid(rng)

    def new_value(self, rng: random.Random) -> str:
        return str(rng.randint(10**6, 10**7 - 1)) if self.value_type == "numbers" else random_uuid(rng)

    def needle(self, key: str, value: str) -> str:
        return f"One of the special magic {self.value_type} for {key} is: {value}."

    def plan(self, ctx: Context, rng: random.Random, length: int) -> dict[str, Any]:
        keys: list[str] = []
        for _ in range(max(self.keys, self.queries)):
            keys.append(self.new_key(rng, set(keys)))
        values = [[self.new_value(rng) for _ in range(self.values)] for _ in keys]
        needles = [self.needle(k, v) for k, vs in zip(keys, values, strict=True) for v in vs]
        rng.shuffle(needles)
        asked = sorted(rng.sample(range(len(keys)), self.queries))
        return {"keys": keys, "needles": needles, "query_keys": [keys[i] for i in asked],
                "answers": [v for i in asked for v in values[i]]}

    def body(self, plan: dict[str, Any]) -> Body:
        query = plan["query_keys"]
        query = query[0] if len(query) == 1 else ", ".join(query[:-1]) + ", and " + query[-1]
        kind = self.value_type
        if self.queries * self.values == 1:  # RULER's singular wording
            one = kind[:-1]
            return Body(f"A special magic {one} is hidden within the following text. Make sure to memorize it. "
                        f"I will quiz you about the {one} afterwards.\n",
                        f"\nWhat is the special magic {one} for {query} mentioned in the provided text?",
                        f" The special magic {one} for {query} mentioned in the provided text is")
        return Body(f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                    f"I will quiz you about the {kind} afterwards.\n",
                    f"\nWhat are all the special magic {kind} for {query} mentioned in the provided text?",
                    f" The special magic {kind} for {query} mentioned in the provided text are")

    def context(self, ctx: Context, plan: dict[str, Any], budget: int, rng: random.Random) -> list[int]:
        enc = encoder(ctx)
        kind = self.haystack_kind(ctx.options)
        if kind == "needles":
            return self.needle_lines(enc, plan, budget, rng)
        needles = enc.many([" " + n for n in plan["needles"]])
        tokens = budget - sum(map(len, needles))
        if tokens < 0:
            raise DataNeeded(f"{self.name}: the needles take {sum(map(len, needles))} tokens, more than the "
                             f"{budget} the context has at this length; use longer --lengths")
        stream = corpus_haystack(ctx, tokens) if kind == "corpus" else noise_haystack(enc)
        ids, boundaries = window(stream, tokens, rng)
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        plan["depths"] = depths
        return insert(ids, boundaries, list(zip(depths, needles, strict=True)))

    def needle_lines(self, enc: Encoder, plan: dict[str, Any], budget: int, rng: random.Random) -> list[int]:
        """RULER's needle haystack: distractor needles, one per line, the real ones among them; exactly ``budget``."""
        real = enc.many([n + "\n" for n in plan["needles"]])
        left = budget - sum(map(len, real))
        if left < 0:
            raise DataNeeded(f"{self.name}: the needles take {budget - left} tokens, more than the {budget} the "
                             "context has at this length; use longer --lengths")
        lines: list[list[int]] = []
        taken = set(plan["keys"])
        full = False
        while not full:  # distractors are drawn and tokenized 256 at a time (each is unique: nothing to cache)
            texts = [self.needle(self.new_key(rng, taken), self.new_value(rng)) + "\n" for _ in range(256)]
            for line in enc.fresh(texts):
                if len(line) > left:
                    full = True
                    break
                lines.append(line)
                left -= len(line)
        for needle in real:  # RULER inserts the real needles at random places among the distractors
            lines.insert(rng.randrange(len(lines) + 1), needle)
        plan["distractors"] = len(lines) - len(real)
        return noise_pad(enc, left) + [i for line in lines for i in line]


class NiahSingle(Needles):
    member, ruler = "niah-single", "niah_single_2"
    description = "RULER: one key's 7-digit number hidden in the haystack"


class NiahUuid(Needles):
    member, ruler = "niah-uuid", "niah_single_3"
    description = "RULER: one key's UUID hidden in the haystack"
    value_type = "uuids"


class NiahMultikey(Needles):
    member, ruler = "niah-multikey", "niah_multikey_1"
    description = "RULER: four keys' numbers hidden, one of them asked"
    keys = 4


class NiahMultivalue(Needles):
    member, ruler = "niah-multivalue", "niah_multivalue"
    description = "RULER: four numbers of one key hidden, all asked"
    values = 4


class NiahMultiquery(Needles):
    member, ruler = "niah-multiquery", "niah_multiquery"
    description = "RULER: four keys' numbers hidden, all asked"
    keys = queries = 4


class KvRetrieval(Needles):
    member, ruler = "kv-retrieval", "niah_multikey_3"
    description = "RULER: the value of one UUID key among UUID key-value needles"
    key_type = value_type = "uuids"
    default_haystack = None  # always a haystack of key-value needles
    uses_corpus = False

    def haystack_kind(self, options: EvalOptions) -> str | None:
        return None

    def context(self, ctx: Context, plan: dict[str, Any], budget: int, rng: random.Random) -> list[int]:
        return self.needle_lines(encoder(ctx), plan, budget, rng)


# ---- variable tracking --------------------------------------------------------------------------------------


class VariableTracking(SyntheticTask):
    """RULER's vt: one chain of ``hops`` assignments hidden in the haystack; name every variable holding the value."""

    member, ruler = "variable-tracking", "variable_tracking"
    description = "RULER: every variable of an assignment chain that holds a value"
    default_haystack = "noise"
    default_max_new_tokens = 30
    hops = 4
    example_tokens = 500  # RULER builds its worked example at 500 tokens (here at most a quarter of the length)

    def validate(self, options: EvalOptions) -> None:
        super().validate(options)
        if self.haystack_kind(options) == "needles":
            raise TaskError(f"{self.name}: --task-arg haystack=needles applies to the niah tasks only; "
                            "variable-tracking takes haystack=corpus or haystack=noise")

    def chain(self, rng: random.Random, letters: int) -> tuple[list[str], str]:
        names: list[str] = []
        while len(names) < self.hops + 1:
            name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=letters))
            if name not in names:
                names.append(name)
        return names, str(rng.randint(10000, 99999))

    def plan(self, ctx: Context, rng: random.Random, length: int, letters: int = 5) -> dict[str, Any]:
        names, value = self.chain(rng, letters)
        statements = [f" VAR {names[0]} = {value}"]
        statements += [f" VAR {b} = VAR {a}" for a, b in zip(names[:-1], names[1:], strict=True)]
        return {"value": value, "statements": statements, "answers": names}

    def body(self, plan: dict[str, Any]) -> Body:
        value, count = plan["value"], len(plan["answers"])
        return Body("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
                    f"\nQuestion: Find all variables that are assigned the value {value} in the text above.",
                    f" Answer: According to the chain(s) of variable assignment in the text above, {count} "
                    f"variables are assigned the value {value}, they are:")

    def context(self, ctx: Context, plan: dict[str, Any], budget: int, rng: random.Random) -> list[int]:
        enc = encoder(ctx)
        statements = enc.many(plan["statements"])
        tokens = budget - sum(map(len, statements))
        if tokens < 0:
            raise DataNeeded(f"{self.name}: the chain takes {sum(map(len, statements))} tokens, more than the "
                             f"{budget} the context has at this length; use longer --lengths")
        stream = corpus_haystack(ctx, tokens) if self.haystack_kind(ctx.options) == "corpus" else noise_haystack(enc)
        ids, boundaries = window(stream, tokens, rng)
        depths = sorted(rng.random() for _ in statements)  # chain order is kept: depths ascend along it
        plan["depths"] = [round(d, 6) for d in depths]
        return insert(ids, boundaries, list(zip(depths, statements, strict=True)))

    def example(self, ctx: Context, plan: dict[str, Any], length: int, rng: random.Random) -> list[int]:
        """RULER's worked example: a smaller prompt (3-letter names) with its answer, then a blank line."""
        enc = encoder(ctx)
        plan = self.plan(ctx, rng, length, letters=3)
        size = min(self.example_tokens, length // 4)
        try:
            ids = self.assemble(ctx, plan, size, rng, [], chat=False)[len(data.special_prefix(ctx.tokenizer)):]
        except DataNeeded:
            raise DataNeeded(f"{self.name}: length {length} is too short for RULER's worked example (built at a "
                             f"quarter of the length, {size} tokens); use longer --lengths") from None
        return ids + enc(" " + " ".join(plan["answers"])) + enc("\n\n")

    def data_record(self, ctx: Context) -> dict[str, Any]:
        return {**super().data_record(ctx), "hops": self.hops, "example_tokens": self.example_tokens}


# ---- common words -------------------------------------------------------------------------------------------

WORD = re.compile(r"(?<![^\s(\"])[a-z]{3,12}(?=[\s.,;:!?)])")  # a lowercase word between spaces/punctuation
NOISE_WORDS = set(re.findall(r"[a-z]+", FILLER.lower()))
VOCABULARY_CHARS = 2_000_000  # the corpus text read for the word list; a fixed amount keeps the list fixed


class CommonWords(SyntheticTask):
    """RULER's cwe: a numbered list where 10 words repeat often (30×; 6× below 4k) and the rest rarely (3×; 1×)."""

    member, ruler = "common-words", "common_words_extraction"
    description = "RULER: the 10 most repeated words of a numbered word list"
    default_max_new_tokens = 120
    common = 10

    def reads_corpus(self, options: EvalOptions) -> bool:
        return True

    def repeats(self, length: int) -> tuple[int, int]:
        return (6, 1) if length < 4096 else (30, 3)  # RULER's settings below and from 4096 tokens

    def vocabulary(self, ctx: Context) -> list[str]:
        """The corpus's lowercase words (3–12 letters) seen at least twice, noise words excluded, sorted."""
        found = ctx.cache.get("synthetic:vocabulary")
        if found is None:
            counts: Counter[str] = Counter()
            read = 0
            for doc in ctx.corpus.documents(1):
                counts.update(WORD.findall(doc.text))
                read += len(doc.text)
                if read >= VOCABULARY_CHARS:
                    break
            found = ctx.cache["synthetic:vocabulary"] = sorted(w for w, n in counts.items()
                                                               if n >= 2 and w not in NOISE_WORDS)
        return found

    def numbered(self, enc: Encoder, words: list[str]) -> list[int]:
        items = enc.many([f" {i + 1}." for i in range(len(words))])
        spelled = enc.many([" " + w for w in words])
        return [i for number, word in zip(items, spelled, strict=True) for i in number + word]

    def plan(self, ctx: Context, rng: random.Random, length: int) -> dict[str, Any]:
        vocabulary = self.vocabulary(ctx)
        order = rng.sample(vocabulary, len(vocabulary))
        return {"_order": order, "_length": length, "answers": order[:self.common]}

    def body(self, plan: dict[str, Any]) -> Body:
        return Body("Below is a numbered list of words. In these words, some appear more often than others. "
                    "Memorize the ones that appear most often.\n",
                    f"\nQuestion: What are the {self.common} most common words in the above list?",
                    f" Answer: The top {self.common} words that appear most often in the list are:")

    def context(self, ctx: Context, plan: dict[str, Any], budget: int, rng: random.Random) -> list[int]:
        enc = encoder(ctx)
        often, rarely = self.repeats(plan["_length"])
        pool = [w for w in plan["_order"] if w not in plan["_example_words"]]
        common, rare = pool[:self.common], pool[self.common:]
        costs = dict(zip(pool, map(len, enc.many([" " + w for w in pool])), strict=True))
        items = self.common * often
        total = often * sum(costs[w] for w in common) + self.number_cost(enc, 0, items)
        if total > budget:
            raise DataNeeded(f"{self.name}: the {self.common} common words repeated {often}× take {total} tokens, "
                             f"more than the {budget} the context has at this length; use longer --lengths")
        used = 0
        while used < len(rare):
            more = rarely * costs[rare[used]] + self.number_cost(enc, items, items + rarely)
            if total + more > budget:
                break
            total, items, used = total + more, items + rarely, used + 1
        else:
            raise data.DataError(f"{self.name}: the corpus has only {len(pool)} distinct words, too few to fill "
                                 f"{budget} tokens; use shorter --lengths or a corpus with more words (--data)")
        words = common * often + rare[:used] * rarely
        rng.shuffle(words)
        plan.update(rare_words=used, repeats=[often, rarely])
        return noise_pad(enc, budget - total) + self.numbered(enc, words)

    def number_cost(self, enc: Encoder, start: int, stop: int) -> int:
        """Tokens of the item numbers ``start+1 … stop`` (``" 12."``)."""
        return sum(map(len, enc.many([f" {i + 1}." for i in range(start, stop)])))

    def example(self, ctx: Context, plan: dict[str, Any], length: int, rng: random.Random) -> list[int]:
        """RULER's worked example: 20 words (10 common ×3, 10 rare ×1; from 4096 tokens 40 words, ×10 / ×3)."""
        enc = encoder(ctx)
        size, often, rarely = (20, 3, 1) if length < 4096 else (40, 10, 3)
        words = plan["_order"][-size:]  # from the far end of the order, so never one of the task's words
        plan["_example_words"] = set(words)
        common, rare = words[:self.common], words[self.common:]
        listed = common * often + rare * rarely
        rng.shuffle(listed)
        text = self.body(plan)
        answer = " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(common))
        return (enc(text.instruction) + self.numbered(enc, listed) + enc(text.question) + enc(text.answer_prefix)
                + enc(answer) + enc("\n"))


# ---- frequent words -----------------------------------------------------------------------------------------


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann ζ(α) for α > 1: a partial sum plus its Euler–Maclaurin tail (error far below 1e-9)."""
    partial = sum(k ** -alpha for k in range(1, terms))
    return partial + terms ** (1 - alpha) / (alpha - 1) + terms ** -alpha / 2


class FrequentWords(SyntheticTask):
    """RULER's fwe: coded 6-letter words with Zipf counts ⌊N·k^-α/ζ(α)⌋; rank 1 is the noise word ``...``."""

    member, ruler = "frequent-words", "freq_words_extraction"
    description = "RULER: the 3 most frequent coded words of Zipf-distributed text"
    uses_corpus = False
    default_max_new_tokens = 50
    alpha = 2.0
    letters = 6

    def plan(self, ctx: Context, rng: random.Random, length: int) -> dict[str, Any]:
        size = max(length // 50, 5)  # RULER: vocabulary of max_seq_length // 50 coded words
        vocab: set[str] = set()
        while len(vocab) < size:
            vocab.add("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=self.letters)))
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
        norm = zeta(self.alpha)
        return [int(words * k ** -self.alpha / norm) for k in range(1, size + 1)]

    def context(self, ctx: Context, plan: dict[str, Any], budget: int, rng: random.Random) -> list[int]:
        enc = encoder(ctx)
        vocab = plan["_vocabulary"]
        costs = list(map(len, enc.many([" " + w for w in vocab])))

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
        ids = [i for w in text for i in enc(" " + w)]
        return tail_of(enc(" ..."), budget - len(ids)) + ids  # more of the noise word keeps the answer


# ---- the family -------------------------------------------------------------------------------------------

MEMBERS: dict[str, SyntheticTask] = {task.member: task for task in (
    NiahSingle(), NiahUuid(), NiahMultikey(), NiahMultivalue(), NiahMultiquery(), KvRetrieval(),
    VariableTracking(), CommonWords(), FrequentWords())}
ALIASES = {"cwe": "common-words", "fwe": "frequent-words"}


def expand(member: str) -> list[Task]:
    """``all``, a member name or an alias → tasks (the same objects every time, so repeats are dropped)."""
    if member == "all":
        return list(MEMBERS.values())
    name = ALIASES.get(member, member)
    if name not in MEMBERS:
        raise TaskError(f"unknown synthetic task {member!r}. Valid: {PREFIX}:<{members()}>")
    return [MEMBERS[name]]


def members() -> str:
    return "|".join([*MEMBERS, *ALIASES, "all"])


register_family(PREFIX, expand, members())


# ---- effective length -------------------------------------------------------------------------------------


def effective_length(records: Iterable[dict[str, Any]], threshold: float | None = None) -> list[dict[str, Any]]:
    """RULER's effective length of each (model, rope, task) in the records.

    The effective length is the longest evaluated length L such that the score at L **and at every shorter
    evaluated length** is above the threshold (in percent; RULER's 85.6 is Llama-2-7B's average at 4k). A
    length whose cell is not ``ok`` (out of memory, error) counts as below. None means even the shortest
    length is below. ``threshold=None`` uses the threshold the records were run with (``--task-arg
    threshold=…``), else 85.6. Records that differ in settings (train_len, dtype, attn, config) are kept apart.
    When a (model, rope) has two or more synthetic tasks, a row ``synthetic:mean`` applies the rule to their
    mean score at the lengths every one of them has, as RULER does for its headline.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    for r in records:
        task = str(r.get("task", ""))
        if not task.startswith(PREFIX + ":"):
            continue
        key = (r.get("model"), r.get("rope"), task, r.get("train_len"), r.get("dtype"), r.get("attn"),
               json.dumps(r.get("config") or {}, sort_keys=True))
        group = groups.setdefault(key, {"rope_input": r.get("rope_input") or r.get("rope"), "scores": {},
                                        "threshold": DEFAULT_THRESHOLD})
        metrics = r.get("metrics") or {}
        ok = r.get("status") == "ok" and isinstance(metrics.get("score"), int | float)
        group["scores"][int(r["length"])] = float(metrics["score"]) if ok else None
        recorded = (r.get("data") or {}).get("threshold")
        if isinstance(recorded, int | float):
            group["threshold"] = float(recorded)
    rows = []
    for (model, rope, task, train_len, dtype, attn, config), group in groups.items():
        rows.append(_row(model, rope, group["rope_input"], task, train_len, dtype, attn, json.loads(config),
                         group["scores"], group["threshold"] if threshold is None else threshold))
    means: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        means.setdefault((row["model"], row["rope"], row["train_len"], row["dtype"], row["attn"]), []).append(row)
    for (model, rope, train_len, dtype, attn), parts in means.items():
        if len({p["task"] for p in parts}) < 2:
            continue
        shared = set.intersection(*(set(p["scores"]) for p in parts))
        scores = {}
        for length in shared:
            values = [p["scores"][length] for p in parts]
            scores[length] = None if None in values else sum(values) / len(values)
        limit = max(p["threshold"] for p in parts) if threshold is None else threshold
        rows.append(_row(model, rope, parts[0]["rope_input"], f"{PREFIX}:mean", train_len, dtype, attn,
                         {"tasks": sorted(p["task"] for p in parts)}, scores, limit))
    return rows


def _row(model, rope, rope_input, task, train_len, dtype, attn, config, scores: dict[int, float | None],
         limit: float) -> dict[str, Any]:
    effective = None
    for length in sorted(scores):
        score = scores[length]
        if score is None or not 100 * score > limit:
            break
        effective = length
    return {"model": model, "rope": rope, "rope_input": rope_input, "task": task, "train_len": train_len,
            "dtype": dtype, "attn": attn, "config": config, "threshold": limit,
            "scores": dict(sorted(scores.items())), "effective_length": effective}


def print_effective_lengths(records: Iterable[dict[str, Any]], console, threshold: float | None = None) -> None:
    """Print one table per model: effective length of each synthetic task × RoPE variant (nothing if none)."""
    from rich.table import Table

    from lctx.results import format_length

    rows = effective_length(records, threshold)
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        table = Table(title=f"effective length (RULER: longest length whose score, and every shorter one's, is "
                      f"above the threshold) · {model}", title_justify="left")
        for column in ("task", "rope", "threshold", "effective length", "scores by length"):
            table.add_column(column, overflow="fold")
        for row in mine:
            shortest = format_length(min(row["scores"])) if row["scores"] else "?"
            effective = (format_length(row["effective_length"]) if row["effective_length"] is not None
                         else f"< {shortest}")
            scores = "  ".join(f"{format_length(n)}: {'–' if s is None else f'{100 * s:.1f}'}"
                               for n, s in row["scores"].items())
            table.add_row(row["task"], str(row["rope_input"]), f"{row['threshold']:g}", effective, scores)
        console.print(table)
