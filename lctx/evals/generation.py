"""The one trial loop of every task answered by greedy generation (passkey, niah, RULER-style, LongBench).

A generation task only says how to build a cell's requests (:meth:`GenerationTask.requests`, token ids with a
budget and stop ids), how to score one answer (:meth:`~GenerationTask.score`) and how to aggregate a cell's
rows (:meth:`~GenerationTask.aggregate`); the engine answers, under the cell's RoPE variant.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from lctx.engine import Engine, GenerateRequest, Generation
from lctx.evals import Cell, Outcome, Report, Task, forward_cost
from lctx.patches import RopeSpec


class GenerationTask(Task):
    """Base of the tasks whose cells are a list of greedy answers; see the module docstring."""

    def requests(self, engine: Engine, cell: Cell) -> Iterator[GenerateRequest]:
        raise NotImplementedError

    def score(self, request: GenerateRequest, answer: Generation) -> dict[str, Any]:
        raise NotImplementedError

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def data_record(self, engine: Engine, cell: Cell) -> dict[str, Any] | None:
        """What the record says about the prompts' data and settings (shared by the cell's samples)."""
        return None

    def run(self, engine: Engine, spec: RopeSpec, cells: list[Cell], report: Report) -> dict[Cell, Outcome]:
        outcomes = {}
        with engine.session(spec) as session:
            for cell in cells:
                rows = []
                for batch in batches(self.requests(engine, cell), engine.batch_size):
                    for request, answer in zip(batch, session.generate_batch(batch), strict=True):
                        rows.append(self.score(request, answer))
                        report(forward_cost(cell.length))
                outcomes[cell] = Outcome(metrics=self.aggregate(rows), samples=rows,
                                         data=self.data_record(engine, cell))
        return outcomes


def batches(requests: Iterable[GenerateRequest], size: int) -> Iterator[list[GenerateRequest]]:
    """Consecutive requests of one shape (prompt length, budget, stops), at most ``size`` at a time."""
    batch: list[GenerateRequest] = []
    for request in requests:
        if batch and (len(batch) == size or _shape(batch[0]) != _shape(request)):
            yield batch
            batch = []
        batch.append(request)
    if batch:
        yield batch


def _shape(request: GenerateRequest) -> tuple:
    return len(request.ids), request.max_new_tokens, request.stop, request.min_new_tokens
