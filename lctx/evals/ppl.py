"""Perplexity (``ppl``): truncated (default) or sliding-window, memory-lean, token-weighted.

Truncated mode: for each length L, the first L tokens of each of ``--samples`` documents (documents shorter
than L are skipped, never padded). PPL = exp(mean NLL over the L−1 predicted tokens), token-weighted over
documents. The tokenizer is used as is: when it adds a BOS it is the first of the L tokens (recorded as
``data.bos_added``).

Sliding-window mode (``--stride S``): each selected document is scored in full with windows of L tokens
moved by S; every token is scored exactly once, with up to L−1 tokens of context (the first window scores
all of its tokens, later ones only their last S), so all lengths and variants score the same tokens.

Both modes record the loss by position bucket (8 equal buckets of window position over [0, L)) and the
loss on the last ``--last-k`` positions of the window.

Memory: logits for the whole sequence are never materialised. The base model returns final hidden states
(O(L·d)); the LM head and the cross-entropy run over chunks of :data:`CHUNK` positions with float32 logits,
and sums accumulate in float64. For variants whose output at a position does not depend on the total length
(``spec.length_dependent`` false), all lengths of a document come from one forward at the longest length:
by causality the per-token NLLs of a prefix are those of the shorter forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from lctx import data, patches
from lctx.evals import Cell, Context, EvalOptions, Outcome, Report, Task, TaskError, forward_cost, register
from lctx.patches import RopeSpec

CHUNK = 1024
BUCKETS = 8


@torch.inference_mode()
def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states ``(n, d)`` of the base model for one sequence of token ids ``(n,)``."""
    device = model.get_input_embeddings().weight.device
    out = model.base_model(input_ids=ids[None].to(device), use_cache=False)
    return out.last_hidden_state[0]


@torch.inference_mode()
def nll_from_hidden(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Per-position NLL (float32) of ``targets[i]`` given ``hidden[i]``, LM head applied ``chunk`` rows at a time."""
    head = model.get_output_embeddings()
    device = head.weight.device
    process = patches.arch.logits_processor(model)  # the forward's own soft-cap, logit scale, … in its dtype
    out = torch.empty(len(targets), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        end = min(start + chunk, len(targets))
        logits = process(head(hidden[start:end].to(device))).float()
        out[start:end] = F.cross_entropy(logits, targets[start:end].to(device), reduction="none").cpu()
    return out


def token_nll(model, ids: torch.Tensor | list[int], chunk: int = CHUNK) -> torch.Tensor:
    """NLL of tokens 1..n−1 of ``ids`` (float32, length n−1), as ``cross_entropy(model(ids).logits[:-1], ids[1:])``."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    return nll_from_hidden(model, hidden_states(model, ids)[:-1], ids[1:], chunk)


def check_head(model, ids: torch.Tensor | list[int], tokens: int = 64) -> None:
    """Raise TaskError when :func:`token_nll` does not reproduce ``model(ids).logits`` on a short prefix.

    The memory-lean path applies the output embedding (and a final logit soft-cap) itself; a model whose
    forward post-processes logits in another way (a logit scale, an added bias) would get wrong perplexities
    without a word. Tolerances allow for bf16.
    """
    ids = torch.as_tensor(ids[:tokens], dtype=torch.long)
    lean = token_nll(model, ids)
    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0, :-1].float()
    plain = F.cross_entropy(logits, ids[1:].to(logits.device), reduction="none").cpu()
    if not torch.allclose(lean, plain, rtol=0.02, atol=0.05):
        worst = float((lean - plain).abs().max())
        raise TaskError(f"ppl: the chunked LM head differs from {type(model).__name__}'s own logits by up to "
                        f"{worst:.3g} nats per token; this architecture post-processes its logits in a way "
                        "lctx does not reproduce, so its perplexity would be wrong")


def sliding_nll(model, ids: torch.Tensor | list[int], window: int, stride: int,
                chunk: int = CHUNK, report=None) -> tuple[torch.Tensor, torch.Tensor]:
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
        hidden = hidden_states(model, ids[begin:end])
        rows = torch.arange(first - begin - 1, end - begin - 1)
        nlls.append(nll_from_hidden(model, hidden[rows], ids[first:end], chunk))
        positions.append(rows + 1)
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


@register
class Perplexity(Task):
    name = "ppl"
    description = "perplexity of the first L tokens of each document (or sliding windows with --stride)"
    metric = "ppl"
    higher_is_better = False
    default_samples = 1
    uses_corpus = True
    memory_profile = "loss"

    def config(self, options: EvalOptions) -> dict[str, Any]:
        return {
            "mode": "sliding" if options.stride else "truncated",
            "stride": options.stride,
            "last_k": options.last_k,
            "samples": self.samples(options),
            "data": _data_id(options),
        }

    def validate(self, options: EvalOptions) -> None:
        if options.stride is not None:
            too_long = [n for n in options.lengths if options.stride > n]
            if options.stride < 1 or too_long:
                raise TaskError(f"--stride {options.stride} must be between 1 and each length "
                                f"(shortest: {min(options.lengths)})")
        if options.last_k < 1:
            raise TaskError(f"--last-k {options.last_k} must be at least 1")

    def groups(self, spec: RopeSpec, cells: list[Cell], options: EvalOptions) -> list[list[Cell]]:
        if options.stride or spec.length_dependent or len(cells) < 2:
            return [[cell] for cell in cells]
        return [sorted(cells, key=lambda c: c.length)]

    def cost(self, cells: list[Cell], options: EvalOptions) -> float:
        samples = self.samples(options)
        if options.stride:  # rough: a long document at every length
            return sum(forward_cost(c.length) * 16 * c.length / options.stride for c in cells) * samples
        return forward_cost(max(c.length for c in cells)) * samples

    def check(self, ctx: Context, cells: list[Cell]) -> None:
        samples = self.samples(ctx.options)
        for length in sorted({c.length for c in cells}):
            data.select(ctx.corpus, ctx.tokenizer, length, samples)

    def run(self, ctx: Context, spec: RopeSpec, cells: list[Cell], report: Report) -> dict[Cell, Outcome]:
        options = ctx.options
        samples = self.samples(options)
        selections = {c: data.select(ctx.corpus, ctx.tokenizer, c.length, samples) for c in cells}
        if not ctx.cache.get("ppl-head-checked"):  # once per model, before any patch
            check_head(ctx.model, selections[cells[0]].docs[0][1])
            ctx.cache["ppl-head-checked"] = True
        per_cell: dict[Cell, list[dict[str, Any]]] = {c: [] for c in cells}
        shared = len(cells) > 1
        if options.stride:
            (cell,) = cells
            with patches.apply(ctx.model, spec, ctx.train_len, seq_len=cell.length):
                for name, ids in selections[cell].docs:
                    nll, positions = sliding_nll(ctx.model, ids, cell.length, options.stride, report=report)
                    summary = summarize(nll, positions, cell.length, options.last_k)
                    per_cell[cell].append({"doc": name, "doc_tokens": len(ids), **summary})
        else:
            # document -> lengths wanted from it; one forward per document at its longest wanted length
            wanted: dict[str, tuple[list[int], list[Cell]]] = {}
            for cell, selection in selections.items():
                for name, ids in selection.docs:
                    wanted.setdefault(name, (ids, []))[1].append(cell)
            seq_len = cells[0].length if spec.length_dependent else None
            with patches.apply(ctx.model, spec, ctx.train_len, seq_len=seq_len):
                for name, (ids, doc_cells) in wanted.items():
                    longest = max(c.length for c in doc_cells)
                    nll = token_nll(ctx.model, ids[:longest])
                    for cell in doc_cells:
                        prefix = nll[:cell.length - 1]
                        positions = torch.arange(1, cell.length)
                        per_cell[cell].append({"doc": name, **summarize(prefix, positions, cell.length,
                                                                        options.last_k)})
                    report(forward_cost(longest))
        bos = data.special_prefix(ctx.tokenizer)
        outcomes = {}
        for cell in cells:
            selection = selections[cell]
            outcomes[cell] = Outcome(
                metrics=aggregate(per_cell[cell], cell.length),
                samples=per_cell[cell],
                data={
                    "id": ctx.corpus.id,
                    "description": ctx.corpus.describe(samples),
                    "documents": [name for name, _ in selection.docs],
                    "skipped_short": selection.skipped,
                    "samples_requested": samples,
                    "samples_used": len(selection.docs),
                    "bos_added": bool(bos),
                    "bos_ids": bos,
                },
                extra={"shared_forward": sorted(c.length for c in cells)} if shared else {},
                notes=_selection_notes(selection, samples),
            )
        return outcomes


def _data_id(options: EvalOptions) -> str:
    return data.open_corpus(options.data, options.dataset, options.text_field).id


def _selection_notes(selection: data.Selection, samples: int) -> list[str]:
    """What the console should say about documents skipped for being short, or too few long enough."""
    notes = []
    if selection.skipped:
        notes.append(f"{selection.skipped} document(s) shorter than {selection.length} tokens skipped")
    if len(selection.docs) < samples:
        notes.append(f"only {len(selection.docs)} of {samples} requested documents have {selection.length} tokens")
    return notes
