"""RULER's variable tracking: one chain of assignments hidden in the haystack; name every variable holding a value."""

from __future__ import annotations

import random
from typing import Any

from lctx.engine import Engine
from lctx.evals import max_new_tokens_param
from lctx.evals.synthetic import ruler as generators
from lctx.evals.synthetic.base import COMMON, Body, DataNeeded, SyntheticTask, haystack_param, insert, window
from lctx.spec import Param


class VariableTracking(SyntheticTask):
    """RULER's vt; the worked example before the task is a smaller instance (3-letter names), answered.

    ``fit=ruler``: RULER's (one statement per line among the noise lines, ``VAR B = VAR A `` with its trailing
    space, values 10000–99998, the answer prefix ending in a space, the example built at 500 tokens);
    ``fit=exact``: lctx's exact-length generator.
    """

    description = "RULER variable tracking: every variable of an assignment chain that holds a value"
    template = "variable_tracking"
    params = (*COMMON, max_new_tokens_param(30),
              Param("hops", int, 4, "assignments after the first in the chain", ge=1),
              haystack_param("noise", ("corpus", "noise")))
    example_tokens = 500  # RULER builds its worked example at 500 tokens (here at most a quarter of the length)

    def ruler_samples(self, engine: Engine, cell: generators.Cell) -> list[generators.Sample]:
        bare = "".join(generators.TEMPLATES[self.template])  # the example's template: no chat template around it
        return generators.variable_tracking(cell, self.args, self.args.samples, bare, self.essay)

    def chain(self, rng: random.Random, letters: int) -> tuple[list[str], str]:
        names: list[str] = []
        while len(names) < self.args.hops + 1:
            name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=letters))
            if name not in names:
                names.append(name)
        return names, str(rng.randint(10000, 99999))

    def plan(self, engine: Engine, rng: random.Random, length: int, letters: int = 5) -> dict[str, Any]:
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

    def context(self, engine: Engine, plan: dict[str, Any], budget: int, rng: random.Random) -> list[int]:
        statements = engine.pieces(plan["statements"])
        tokens = budget - sum(map(len, statements))
        if tokens < 0:
            raise DataNeeded(f"{self.name}: the chain takes {sum(map(len, statements))} tokens, more than the "
                             f"{budget} the context has at this length; use longer --lengths")
        ids, points = window(self.haystack(engine, tokens), tokens, rng)
        depths = sorted(rng.random() for _ in statements)  # chain order is kept: depths ascend along it
        plan["depths"] = [round(d, 6) for d in depths]
        return insert(ids, points, list(zip(depths, statements, strict=True)))

    def example(self, engine: Engine, plan: dict[str, Any], length: int, rng: random.Random) -> list[int]:
        example = self.plan(engine, rng, length, letters=3)
        size = min(self.example_tokens, length // 4)
        try:
            ids = self.assemble(engine, example, size, rng, [], chat=False)[len(engine.prefix):]
        except DataNeeded:
            raise DataNeeded(f"{self.name}: length {length} is too short for RULER's worked example (built at a "
                             f"quarter of the length, {size} tokens); use longer --lengths") from None
        return ids + engine.piece(" " + " ".join(example["answers"])) + engine.piece("\n\n")

    def data_record(self, engine: Engine, cell) -> dict[str, Any]:
        return {**super().data_record(engine, cell), "hops": self.args.hops, "example_tokens": self.example_tokens}
