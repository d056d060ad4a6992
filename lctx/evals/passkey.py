"""Passkey retrieval (``passkey``) and the grid/prompt/scoring machinery it shares with ``niah``.

A prompt is built in token space, exactly ``L`` tokens long: the tokenizer's own prefix (BOS, if it adds
one), the instruction, filler with the needle inserted at a depth, and the question. Each piece is tokenized
on its own and the ids are concatenated; the filler ids are trimmed so that the total is exactly ``L``
(nothing is decoded and re-encoded). The needle goes to the filler boundary (end of a filler sentence)
nearest to ``depth × filler length``: depth 0 puts it right after the instruction, depth 1 right before the
question.

Keys and filler offsets come from ``random.Random`` seeded by (task, --seed, length, depth, trial), so every
variant sees identical prompts. The answer is generated greedily with the KV cache (the prefill keeps only
the last position's logits, ``logits_to_keep=1``); a trial is correct when the first run of digits in the
output equals the key. Each (length, depth) cell aggregates its trials: accuracy with a Wilson 95% interval.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lctx import data, patches
from lctx.evals import Cell, Context, EvalOptions, Outcome, Report, Task, TaskError, forward_cost, register
from lctx.patches import RopeSpec

Z95 = 1.959963984540054


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there are no trials."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def accuracy_metrics(correct: int, trials: int) -> dict[str, Any]:
    low, high = wilson(correct, trials)
    return {"accuracy": correct / trials if trials else None, "ci_low": low, "ci_high": high,
            "correct": correct, "trials": trials}


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


def nearest(boundaries: list[int], target: float) -> int:
    return min(boundaries, key=lambda b: (abs(b - target), b))


def _cache_name(model) -> str:
    """The KV-cache keyword of this transformers version: ``cache`` (5.2x) or ``past_key_values`` (5.0)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _ReservedLayer(DynamicLayer):
    """A DynamicLayer writing into buffers reserved for the whole generation.

    DynamicLayer concatenates every step, so each decoded token copies the whole cache and, for a moment, holds
    it twice (and glibc seldom reuses the slightly smaller blocks it frees): at 32k tokens on SmolLM2, 1.4 GiB
    more. Here a step writes one position; ``keys``/``values`` are views of the filled part.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.filled = capacity, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            shape = key_states.shape[:2]
            self._keys = key_states.new_empty(*shape, self.capacity, key_states.shape[-1])
            self._values = value_states.new_empty(*shape, self.capacity, value_states.shape[-1])
        end = self.filled + key_states.shape[-2]
        if end > self.capacity:  # more than reserved: grow once, amortized
            self.capacity = max(end, 2 * self.capacity)
            for name in ("_keys", "_values"):
                old = getattr(self, name)
                grown = old.new_empty(*old.shape[:2], self.capacity, old.shape[-1])
                grown[:, :, :self.filled] = old[:, :, :self.filled]
                setattr(self, name, grown)
        self._keys[:, :, self.filled:end] = key_states
        self._values[:, :, self.filled:end] = value_states
        self.filled = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.filled = self.get_seq_length()


def reserved_cache(model, capacity: int) -> DynamicCache:
    """A DynamicCache whose full-attention layers reserve ``capacity`` positions (sliding layers unchanged)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [_ReservedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@torch.inference_mode()
def prefill(model, ids: list[int], chunk: int | None = None, reserve: int = 0):
    """The model's output for prompt ``ids`` with its KV cache, last position's logits only, ``chunk`` at a time.

    The cache has room for ``reserve`` more positions (what decoding will add) without reallocating.
    """
    name = _cache_name(model)
    prompt = torch.tensor([ids], device=model.get_input_embeddings().weight.device)
    past: dict[str, Any] = {name: reserved_cache(model, len(ids) + reserve)}
    step = chunk or len(ids)
    for start in range(0, len(ids), step):
        out = model(input_ids=prompt[:, start:start + step], use_cache=True, logits_to_keep=1, **past)
        past = {name: out[name]}
    return out


@torch.inference_mode()
def greedy(model, ids: list[int], max_new_tokens: int, stop_ids: set[int], min_new_tokens: int = 0,
           prefill_chunk: int | None = None) -> list[int]:
    """Greedy decoding with the KV cache; the prefill computes logits for the last position only.

    ``prefill_chunk`` feeds the prompt through the cache that many tokens at a time, so activations scale with
    the chunk instead of the prompt (every lctx variant supports it: rotations depend on positions only, and
    length-dependent variants are frozen by the caller). Stop tokens cannot be chosen for the first
    ``min_new_tokens`` steps (as transformers' ``min_new_tokens``).
    """
    device = model.get_input_embeddings().weight.device
    name = _cache_name(model)
    out = prefill(model, ids, prefill_chunk, reserve=max_new_tokens)
    generated: list[int] = []
    for step in range(max_new_tokens):
        logits = out.logits[0, -1]
        if step < min_new_tokens and stop_ids:
            logits = logits.index_fill(0, torch.tensor(sorted(stop_ids), device=logits.device), -torch.inf)
        token = int(logits.argmax())
        generated.append(token)
        if token in stop_ids or step == max_new_tokens - 1:
            break
        out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **{name: out[name]})
    return generated


_MESSAGE = "\x00lctx-message\x00"  # stands for the user message while the template is rendered


def chat_wrapper(tokenizer) -> tuple[list[int], list[int]]:
    """Ids of the chat template before and after a single user message (with the generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TaskError("--chat-template: this tokenizer has no chat template (a base model?); run without "
                        "--chat-template")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _MESSAGE}], tokenize=False,
                                             add_generation_prompt=True)
    before, found, after = rendered.partition(_MESSAGE)
    if not found:
        raise TaskError("--chat-template: the tokenizer's chat template does not show the user message verbatim")
    return data.encode(tokenizer, before, special=False), data.encode(tokenizer, after, special=False)


@contextlib.contextmanager
def answering(ctx: Context, spec: RopeSpec, length: int, max_new: int) -> Iterator[Callable[[list[int]], str]]:
    """Greedy answers to prompts of ``length`` tokens under ``spec``, decoded to text.

    Length-dependent variants are frozen at prompt + answer, so cached keys and new queries agree.
    """
    tok = ctx.tokenizer
    stop = {i for i in (tok.eos_token_id, getattr(tok, "pad_token_id", None)) if i is not None}
    with patches.apply(ctx.model, spec, ctx.train_len, seq_len=length + max_new):
        yield lambda ids: tok.decode(greedy(ctx.model, ids, max_new, stop, prefill_chunk=ctx.options.prefill_chunk),
                                     skip_special_tokens=True)


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


class RetrievalTask(Task):
    """A (length × depth) grid of needle prompts answered by greedy generation; subclasses give the pieces."""

    metric = "accuracy"
    higher_is_better = True
    uses_depths = True
    default_samples = 5
    digits: int = 5
    default_max_new_tokens = 8
    instruction: str = ""
    needle: str = ""  # with {value}
    question: str = ""

    def max_new_tokens(self, options: EvalOptions) -> int:
        return options.max_new_tokens or self.default_max_new_tokens

    def config(self, options: EvalOptions) -> dict[str, Any]:
        return {"samples": self.samples(options), "seed": options.seed,
                "max_new_tokens": self.max_new_tokens(options)}

    def validate(self, options: EvalOptions) -> None:
        bad = [d for d in options.depths if not 0 <= d <= 1]
        if bad:
            raise TaskError(f"--depths {bad[0]:g} is outside [0, 1]")
        if options.max_new_tokens is not None and options.max_new_tokens < 1:
            raise TaskError(f"--max-new-tokens {options.max_new_tokens} must be at least 1")

    def pieces(self, options: EvalOptions) -> tuple[str, str, str]:
        """(instruction, needle template with {value}, question) as text."""
        return self.instruction, self.needle, self.question

    def filler(self, ctx: Context, tokens: int, rng: random.Random) -> Filler:
        raise NotImplementedError

    def cost(self, cells: list[Cell], options: EvalOptions) -> float:
        return sum(forward_cost(c.length) for c in cells) * self.samples(options)

    # -- prompts --

    def fixed_ids(self, ctx: Context) -> tuple[list[int], str, list[int]]:
        """(BOS + instruction ids, needle template, question ids)."""
        instruction, needle, question = self.pieces(ctx.options)
        tok = ctx.tokenizer
        return (data.special_prefix(tok) + data.encode(tok, instruction, special=False), needle,
                data.encode(tok, question, special=False))

    def trial_value(self, rng: random.Random) -> str:
        """The trial's key: the first draw of its generator (the filler offset comes after)."""
        return str(rng.randint(10 ** (self.digits - 1), 10 ** self.digits - 1))

    def fixed_length(self, ctx: Context, length: int, depth: float, trial: int) -> int:
        """Tokens of a trial's prompt without filler (its key's tokenization included)."""
        head, needle, tail = self.fixed_ids(ctx)
        value = self.trial_value(trial_rng(self.name, ctx.options.seed, length, depth, trial))
        return len(head) + len(data.encode(ctx.tokenizer, needle.format(value=value), special=False)) + len(tail)

    def build_prompt(self, ctx: Context, length: int, depth: float, trial: int) -> Prompt:
        """A prompt of exactly ``length`` tokens with the needle at ``depth`` (see the module docstring)."""
        rng = trial_rng(self.name, ctx.options.seed, length, depth, trial)
        value = self.trial_value(rng)
        head, needle_text, tail = self.fixed_ids(ctx)
        needle = data.encode(ctx.tokenizer, needle_text.format(value=value), special=False)
        tokens = length - len(head) - len(needle) - len(tail)
        if tokens < 0:
            raise TaskError(f"{self.name}: length {length} is too short; the prompt without filler already has "
                            f"{length - tokens} tokens")
        filler = self.filler(ctx, tokens, rng)
        assert len(filler.ids) == tokens
        at = nearest(filler.boundaries, depth * tokens)
        ids = head + filler.ids[:at] + needle + filler.ids[at:] + tail
        return Prompt(ids, value, at, tokens, len(head) + at, len(needle), filler.source)

    # -- running --

    def check(self, ctx: Context, cells: list[Cell]) -> None:
        """Every trial's prompt fits its length (keys tokenize to different lengths, so each one is checked)."""
        trials = self.samples(ctx.options)
        for cell in sorted(cells, key=lambda c: (c.length, c.depth)):
            needed = max(self.fixed_length(ctx, cell.length, cell.depth, t) for t in range(trials))
            if needed > cell.length:
                raise TaskError(f"{self.name}: length {cell.length} is too short; the prompt without filler "
                                f"already has {needed} tokens")

    def run(self, ctx: Context, spec: RopeSpec, cells: list[Cell], report: Report) -> dict[Cell, Outcome]:
        options = ctx.options
        outcomes = {}
        for cell in cells:
            trials = []
            with answering(ctx, spec, cell.length, self.max_new_tokens(options)) as answer_to:
                for trial in range(self.samples(options)):
                    prompt = self.build_prompt(ctx, cell.length, cell.depth, trial)
                    output = answer_to(prompt.ids)
                    answer = first_number(output)
                    trials.append({
                        "trial": trial, "value": prompt.value, "output": output, "answer": answer,
                        "correct": answer == prompt.value, "prompt_tokens": len(prompt.ids),
                        "insert_at": prompt.needle_start, "depth_actual": round(prompt.depth_actual, 6),
                        "filler": prompt.filler,
                    })
                    report(forward_cost(cell.length))
            correct = sum(t["correct"] for t in trials)
            outcomes[cell] = Outcome(metrics=accuracy_metrics(correct, len(trials)), samples=trials,
                                     data=self.data_record(ctx))
        return outcomes

    def data_record(self, ctx: Context) -> dict[str, Any]:
        instruction, needle, question = self.pieces(ctx.options)
        return {"instruction": instruction, "needle": needle, "question": question,
                "bos_added": bool(data.special_prefix(ctx.tokenizer))}


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@register
class Passkey(RetrievalTask):
    name = "passkey"
    description = "find a 5-digit pass key hidden at a depth in repeated filler (lengths × depths grid)"
    digits = 5
    default_max_new_tokens = 8
    instruction = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                   "it. I will quiz you about the important information there.")
    needle = " The pass key is {value}. Remember it. {value} is the pass key."
    question = "\nWhat is the pass key? The pass key is"

    def filler(self, ctx: Context, tokens: int, rng: random.Random) -> Filler:
        unit = data.encode(ctx.tokenizer, " " + FILLER, special=False)
        offset = rng.randrange(len(unit))  # the filler starts at a seeded token of the repeated unit
        repeats = (offset + tokens) // len(unit) + 1
        ids = (unit * repeats)[offset:offset + tokens]
        boundaries = sorted({0, tokens, *(i for i in range(tokens) if (offset + i) % len(unit) == 0)})
        return Filler(ids, boundaries, {"offset": offset})

    def data_record(self, ctx: Context) -> dict[str, Any]:
        return {**super().data_record(ctx), "filler": FILLER}
