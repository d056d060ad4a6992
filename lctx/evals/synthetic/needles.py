"""RULER's needle generator (niah_*, multikey/multivalue/multiquery, kv retrieval as its UUID preset).

Keys with values hidden as ``One of the special magic {values} for {key} is: {value}.``, in a haystack of the
corpus (RULER's essay), RULER's noise sentences, or distractor needles one per line (``haystack=needles``).
With ``fit=ruler`` (:mod:`lctx.evals.synthetic.ruler`) word keys are RULER's adjective-noun pairs from
wonderwords, noise lines and needle lines each on their own line, needles at random lines; ``fit=exact`` keeps
lctx's exact-length generator (its own key list, needles inline in a stream).
"""

from __future__ import annotations

import random
import uuid
from typing import Any

from lctx.engine import Engine
from lctx.evals import max_new_tokens_param
from lctx.evals.synthetic import ruler as generators
from lctx.evals.synthetic import ruler_data
from lctx.evals.synthetic.base import (
    COMMON,
    DEPTHS,
    Body,
    DataNeeded,
    SyntheticTask,
    haystack_param,
    insert,
    noise_pad,
    window,
)
from lctx.spec import Param

# fit=exact's keys (lctx's generator before issue 18); fit=ruler draws RULER's, adjective-noun pairs of wonderwords
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


def word_key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in taken:
            return key


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class Needles(SyntheticTask):
    """RULER's niah generator; see the module docstring."""

    description = "RULER niah: keys' values hidden in a haystack, some keys asked"
    template = "niah"
    params = (*COMMON, max_new_tokens_param(128),
              Param("key_type", str, "words", "keys: adjective-noun words or UUIDs", choices=("words", "uuids")),
              Param("value_type", str, "numbers", "values: 7-digit numbers or UUIDs", choices=("numbers", "uuids")),
              Param("keys", int, 1, "keys hidden (each with its values)", ge=1),
              Param("values", int, 1, "values per key", ge=1),
              Param("queries", int, 1, "keys asked (all their values must be answered)", ge=1),
              haystack_param("corpus", ("corpus", "noise", "needles")))

    def ruler_samples(self, engine: Engine, cell: generators.Cell) -> list[generators.Sample]:
        return generators.niah(cell, self.args, self.args.samples, self.essay)

    def data_record(self, engine: Engine, cell) -> dict[str, Any]:
        record = super().data_record(engine, cell)
        if not self.exact and self.args.key_type == "words":
            record["word_lists"] = ruler_data.word_lists()
        return record

    def new_key(self, rng: random.Random, taken: set[str]) -> str:
        return word_key(rng, taken) if self.args.key_type == "words" else random_uuid(rng)

    def new_value(self, rng: random.Random) -> str:
        return str(rng.randint(10**6, 10**7 - 1)) if self.args.value_type == "numbers" else random_uuid(rng)

    def needle(self, key: str, value: str) -> str:
        return f"One of the special magic {self.args.value_type} for {key} is: {value}."

    def plan(self, engine: Engine, rng: random.Random, length: int) -> dict[str, Any]:
        keys: list[str] = []
        for _ in range(max(self.args.keys, self.args.queries)):
            keys.append(self.new_key(rng, set(keys)))
        values = [[self.new_value(rng) for _ in range(self.args.values)] for _ in keys]
        needles = [self.needle(k, v) for k, vs in zip(keys, values, strict=True) for v in vs]
        rng.shuffle(needles)
        asked = sorted(rng.sample(range(len(keys)), self.args.queries))
        return {"keys": keys, "needles": needles, "query_keys": [keys[i] for i in asked],
                "answers": [v for i in asked for v in values[i]]}

    def body(self, plan: dict[str, Any]) -> Body:
        query = plan["query_keys"]
        query = query[0] if len(query) == 1 else ", ".join(query[:-1]) + ", and " + query[-1]
        kind = self.args.value_type
        if self.args.queries * self.args.values == 1:  # RULER's singular wording
            one = kind[:-1]
            return Body(f"A special magic {one} is hidden within the following text. Make sure to memorize it. "
                        f"I will quiz you about the {one} afterwards.\n",
                        f"\nWhat is the special magic {one} for {query} mentioned in the provided text?",
                        f" The special magic {one} for {query} mentioned in the provided text is")
        return Body(f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                    f"I will quiz you about the {kind} afterwards.\n",
                    f"\nWhat are all the special magic {kind} for {query} mentioned in the provided text?",
                    f" The special magic {kind} for {query} mentioned in the provided text are")

    def context(self, engine: Engine, plan: dict[str, Any], budget: int, rng: random.Random) -> list[int]:
        if self.haystack_kind == "needles":
            return self.needle_lines(engine, plan, budget, rng)
        needles = engine.pieces([" " + n for n in plan["needles"]])
        tokens = budget - sum(map(len, needles))
        if tokens < 0:
            raise DataNeeded(f"{self.name}: the needles take {sum(map(len, needles))} tokens, more than the "
                             f"{budget} the context has at this length; use longer --lengths")
        ids, points = window(self.haystack(engine, tokens), tokens, rng)
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        plan["depths"] = depths
        return insert(ids, points, list(zip(depths, needles, strict=True)))

    def needle_lines(self, engine: Engine, plan: dict[str, Any], budget: int, rng: random.Random) -> list[int]:
        """RULER's needle haystack: distractor needles, one per line, the real ones among them; exactly ``budget``."""
        real = engine.pieces([n + "\n" for n in plan["needles"]])
        left = budget - sum(map(len, real))
        if left < 0:
            raise DataNeeded(f"{self.name}: the needles take {budget - left} tokens, more than the {budget} the "
                             "context has at this length; use longer --lengths")
        lines: list[list[int]] = []
        taken = set(plan["keys"])
        full = False
        while not full:  # distractors are drawn and tokenized 256 at a time (each is unique: nothing to cache)
            texts = [self.needle(self.new_key(rng, taken), self.new_value(rng)) + "\n" for _ in range(256)]
            for line in engine.fresh(texts):
                if len(line) > left:
                    full = True
                    break
                lines.append(line)
                left -= len(line)
        for needle in real:  # RULER inserts the real needles at random places among the distractors
            lines.insert(rng.randrange(len(lines) + 1), needle)
        plan["distractors"] = len(lines) - len(real)
        return noise_pad(engine, left) + [i for line in lines for i in line]
