"""Perplexity (``ppl``): truncated (default) or sliding-window, memory-lean, token-weighted.

Truncated mode: for each length L, the first L tokens of each of ``samples`` documents (documents shorter than L
are skipped, never padded). PPL = exp(mean NLL over the L−1 predicted tokens), token-weighted over documents. The
tokenizer is used as is: when it adds a BOS it is the first of the L tokens (recorded as ``data.bos_added``).

Sliding-window mode (``stride=S``): each selected document is scored in full with windows of L tokens moved by
S; every token is scored exactly once, with up to L−1 tokens of context (the first window scores all of its
tokens, later ones only their last S), so all lengths and variants score the same tokens.

Both modes record the loss by position bucket (8 equal buckets of window position over [0, L)) and the loss on
the last ``last_k`` positions of the window.

The engine computes the loss without materialising every position's logits (:mod:`lctx.engine`). For variants
whose output at a position does not depend on the total length (``spec.length_dependent`` false), all lengths of
a document come from one forward at the longest length: by causality the per-token NLLs of a prefix are those of
the shorter forward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

from lctx import data
from lctx.engine import Engine, Session
from lctx.evals import (
    DATA,
    TEXT_FIELD,
    Cell,
    Metric,
    Outcome,
    Report,
    Resample,
    Task,
    TaskError,
    TaskType,
    forward_cost,
)
from lctx.patches import RopeSpec
from lctx.spec import Param, Tokens

BUCKETS = 8


def sliding_nll(session: Session, ids: torch.Tensor | list[int], window: int, stride: int,
                report: Report | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token 1..n−1 scored once with windows of ``window`` tokens moved by ``stride``.

    Returns (nll, position of each scored token inside its window); the first window scores positions
    1..window−1, each later window its last ``end − previous end`` positions.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    if not 1 <= stride <= window:
        raise ValueError(f"stride {stride} must be between 1 and the window ({window})")
    nlls, positions = [], []
    previous_end = 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + window, ids.numel())
        first = max(previous_end, begin + 1)  # first target scored in this window
        nlls.append(session.nll(ids[begin:end], skip=first - begin - 1))
        positions.append(torch.arange(first - begin, end - begin))
        if report is not None:
            report(forward_cost(end - begin))
        previous_end = end
        if end == ids.numel():
            break
    return torch.cat(nlls), torch.cat(positions)


def bucket_edges(length: int) -> list[int]:
    """Bucket b holds the positions p with p·BUCKETS // length == b, i.e. [edges[b], edges[b+1])."""
    return [-(-b * length // BUCKETS) for b in range(BUCKETS + 1)]


def summarize(nll: torch.Tensor, positions: torch.Tensor, length: int, last_k: int) -> dict[str, Any]:
    """Sums for one document: NLL, per position bucket, and over positions ≥ length − last_k."""
    nll = nll.double()
    bucket = torch.clamp(positions * BUCKETS // length, max=BUCKETS - 1)
    last = positions >= length - last_k
    total = float(nll.sum())
    return {
        "tokens": int(nll.numel()),
        "nll_sum": total,
        "ppl": math.exp(total / nll.numel()),
        "bucket_nll_sum": [float(nll[bucket == b].sum()) for b in range(BUCKETS)],
        "bucket_tokens": [int((bucket == b).sum()) for b in range(BUCKETS)],
        "last_k_nll_sum": float(nll[last].sum()),
        "last_k_tokens": int(last.sum()),
    }


def _mean(total: float, count: int) -> float | None:
    return total / count if count else None


def _exp(value: float | None) -> float | None:
    if value is None:
        return None
    return math.exp(value) if value < 700 else math.inf


def aggregate(samples: list[dict[str, Any]], length: int) -> dict[str, Any]:
    """Token-weighted metrics over documents."""
    tokens = sum(s["tokens"] for s in samples)
    nll = _mean(sum(s["nll_sum"] for s in samples), tokens)
    last_tokens = sum(s["last_k_tokens"] for s in samples)
    last = _mean(sum(s["last_k_nll_sum"] for s in samples), last_tokens)
    buckets = [_mean(sum(s["bucket_nll_sum"][b] for s in samples), sum(s["bucket_tokens"][b] for s in samples))
               for b in range(BUCKETS)]
    return {
        "ppl": _exp(nll), "nll": nll, "tokens": tokens,
        "last_k_ppl": _exp(last), "last_k_nll": last, "last_k_tokens": last_tokens,
        "bucket_nll": buckets, "bucket_edges": bucket_edges(length),
    }


class Perplexity(Task):
    description = "perplexity of the first L tokens of each document (or sliding windows with stride)"
    params = (Param("samples", int, 1, "documents per length", ge=1),
              Param("stride", Tokens, None, "sliding-window mode: windows of L tokens moved by this many", ge=1),
              Param("last_k", int, 256, "also report the loss on the last k positions of the window", ge=1),
              DATA, TEXT_FIELD)
    metrics = (Metric("ppl", False, headline=True, label="perplexity, whole window",
                      resample=Resample("nll_sum", "tokens", exp=True)),
               Metric("last_k_ppl", False, headline=True, label="perplexity, last {last_k} tokens",
                      resample=Resample("last_k_nll_sum", "last_k_tokens", exp=True)),
               Metric("nll", False, label="NLL (nats)"), Metric("last_k_nll", False, label="NLL (nats)"))
    figures = ("lines", "position_loss")
    memory_profile = "loss"

    @functools.cached_property
    def corpus(self) -> data.Corpus:
        return data.corpus(self.args.data, self.args.text_field)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "data": self.corpus.id}

    def validate(self) -> None:
        _ = self.corpus  # a bad data path fails here, before any model loads

    def check_lengths(self, lengths: Sequence[int]) -> None:
        if self.args.stride is not None and self.args.stride > min(lengths):
            raise TaskError(f"ppl: stride={self.args.stride} must be at most each length (shortest: {min(lengths)})")

    def groups(self, spec: RopeSpec, cells: list[Cell]) -> list[list[Cell]]:
        if self.args.stride or spec.length_dependent or len(cells) < 2:
            return [[cell] for cell in cells]
        return [sorted(cells, key=lambda c: c.length)]

    def cost(self, cells: list[Cell]) -> float:
        samples, stride = self.args.samples, self.args.stride
        if stride:  # rough: a long document at every length
            return sum(forward_cost(c.length) * 16 * c.length / stride for c in cells) * samples
        return forward_cost(max(c.length for c in cells)) * samples

    def check(self, engine: Engine, cells: list[Cell]) -> None:
        for length in sorted({c.length for c in cells}):
            data.select(self.corpus, engine.tokenizer, length, self.args.samples)

    def run(self, engine: Engine, spec: RopeSpec, cells: list[Cell], report: Report) -> dict[Cell, Outcome]:
        samples, last_k = self.args.samples, self.args.last_k
        selections = {c: data.select(self.corpus, engine.tokenizer, c.length, samples) for c in cells}
        per_cell: dict[Cell, list[dict[str, Any]]] = {c: [] for c in cells}
        if self.args.stride:
            (cell,) = cells
            with engine.session(spec, seq_len=cell.length) as session:
                for name, ids in selections[cell].docs:
                    nll, positions = sliding_nll(session, ids, cell.length, self.args.stride, report=report)
                    per_cell[cell].append({"doc": name, "doc_tokens": len(ids),
                                           **summarize(nll, positions, cell.length, last_k)})
        else:
            # document -> lengths wanted from it; one forward per document at its longest wanted length
            wanted: dict[str, tuple[list[int], list[Cell]]] = {}
            for cell, selection in selections.items():
                for name, ids in selection.docs:
                    wanted.setdefault(name, (ids, []))[1].append(cell)
            seq_len = cells[0].length if spec.length_dependent else None
            with engine.session(spec, seq_len=seq_len) as session:
                for name, (ids, doc_cells) in wanted.items():
                    longest = max(c.length for c in doc_cells)
                    nll = session.nll(ids[:longest])
                    for cell in doc_cells:
                        positions = torch.arange(1, cell.length)
                        per_cell[cell].append({"doc": name, **summarize(nll[:cell.length - 1], positions,
                                                                        cell.length, last_k)})
                    report(forward_cost(longest))
        bos = engine.prefix
        shared = len(cells) > 1
        outcomes = {}
        for cell in cells:
            selection = selections[cell]
            outcomes[cell] = Outcome(
                metrics=aggregate(per_cell[cell], cell.length),
                samples=per_cell[cell],
                data={"id": self.corpus.id, "description": self.corpus.describe(samples),
                      "documents": [name for name, _ in selection.docs], "skipped_short": selection.skipped,
                      "samples_requested": samples, "samples_used": len(selection.docs), "bos_added": bool(bos),
                      "bos_ids": bos},
                extra={"shared_forward": sorted(c.length for c in cells)} if shared else {},
                notes=_selection_notes(selection, samples),
            )
        return outcomes


def _selection_notes(selection: data.Selection, samples: int) -> list[str]:
    """What the console should say about documents skipped for being short, or too few long enough."""
    notes = []
    if selection.skipped:
        notes.append(f"{selection.skipped} document(s) shorter than {selection.length} tokens skipped")
    if len(selection.docs) < samples:
        notes.append(f"only {len(selection.docs)} of {samples} requested documents have {selection.length} tokens")
    return notes


TYPE = TaskType("ppl", Perplexity)
