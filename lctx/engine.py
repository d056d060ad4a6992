"""The engine: the one place that runs a model under a RoPE spec. Tasks build requests; the engine answers them.

A task never touches the model. It asks a :class:`Session` (a model patched with one spec) for

* ``nll(ids)``: the per-token negative log-likelihood of a sequence, computed without materialising the
  logits of every position (the LM head and the cross-entropy run over chunks of :data:`CHUNK` rows);
* ``generate(request)``: a greedy answer with the KV cache, the cache reserved once for prompt + answer,
  the prompt fed ``prefill_chunk`` tokens at a time when asked (activations then scale with the chunk).

and the :class:`Engine` gives the tokenizer-level pieces prompts are built from (cached piece encodings, the
tokenizer's own prefix, the chat template around a user message, stop ids). An engine without a model
(``model=None``) serves those pieces before any weights load, so tasks check their prompts up front.

**Length-dependent variants** (dynamic NTK/YaRN) scale for one length per patch: a session opened with
``seq_len`` freezes it; a generation request freezes it at its own prompt + answer (``request.seq_len``), and
the session re-applies the patch only when that changes, so the prefill and every decoding step share one set
of frequencies. Static variants are applied once per session.

**A second backend** (e.g. vLLM for the frequency variants on GPUs) plugs in here: it must answer the same two
requests under a spec, exactly as :class:`Session` does (same stop rules, same greedy tie-breaking by the lowest
id), and refuse the variants it cannot apply; tasks and the runner would not change.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lctx import patches
from lctx.data import encode, special_prefix
from lctx.patches import RopeSpec

CHUNK = 1024  # LM-head rows per chunk of the memory-lean loss
_MESSAGE = "\x00lctx-message\x00"  # stands for the user message while a chat template is rendered


class EngineError(RuntimeError):
    """The model cannot serve a request exactly (e.g. its logits are post-processed in a way lctx does not
    reproduce); recorded as the cell's error."""


class ChatTemplateError(ValueError):
    """A chat template was asked for and the tokenizer has none that shows the user message verbatim."""


@dataclass(frozen=True)
class GenerateRequest:
    """A greedy generation: prompt ids, budget, stops. ``meta`` travels with it for the task's scoring."""

    ids: list[int]
    max_new_tokens: int
    stop: frozenset[int]
    min_new_tokens: int = 0  # stop ids cannot be chosen before this many new tokens (transformers' meaning)
    meta: Any = field(default=None, compare=False)

    @property
    def seq_len(self) -> int:
        """The length a length-dependent variant scales for: the whole sequence, prompt and answer."""
        return len(self.ids) + self.max_new_tokens


@dataclass(frozen=True)
class Generation:
    tokens: list[int]
    text: str


# ---- the KV cache --------------------------------------------------------------------------------------------


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
def prefill(model, ids: list[int] | list[list[int]], chunk: int | None = None, reserve: int = 0):
    """The model's output for prompt ``ids`` (or a batch of prompts of one length) with its KV cache, last
    position's logits only, ``chunk`` tokens at a time.

    The cache has room for ``reserve`` more positions (what decoding will add) without reallocating.
    """
    name = _cache_name(model)
    batch = ids if ids and isinstance(ids[0], list) else [ids]
    prompt = torch.tensor(batch, device=model.get_input_embeddings().weight.device)
    length = prompt.shape[1]
    past: dict[str, Any] = {name: reserved_cache(model, length + reserve)}
    step = chunk or length
    for start in range(0, length, step):
        out = model(input_ids=prompt[:, start:start + step], use_cache=True, logits_to_keep=1, **past)
        past = {name: out[name]}
    return out


@torch.inference_mode()
def greedy_batch(model, batch: list[list[int]], max_new_tokens: int, stop_ids: frozenset[int] | set[int],
                 min_new_tokens: int = 0, prefill_chunk: int | None = None) -> list[list[int]]:
    """Greedy decoding with the KV cache of prompts of one length, side by side (no padding, so each row sees
    exactly what it would alone); the prefill computes logits for the last position only.

    ``prefill_chunk`` feeds the prompts through the cache that many tokens at a time (every lctx variant supports
    it: rotations depend on positions only, and length-dependent variants are frozen by the session). Stop tokens
    cannot be chosen for the first ``min_new_tokens`` steps. A row that stops keeps its answer; the batch goes on
    until every row has stopped.
    """
    device = model.get_input_embeddings().weight.device
    name = _cache_name(model)
    out = prefill(model, batch, prefill_chunk, reserve=max_new_tokens)
    generated: list[list[int]] = [[] for _ in batch]
    running = list(range(len(batch)))
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]
        if step < min_new_tokens and stop_ids:
            logits = logits.index_fill(1, torch.tensor(sorted(stop_ids), device=logits.device), -torch.inf)
        tokens = logits.argmax(-1).tolist()
        for row in running:
            generated[row].append(tokens[row])
        running = [row for row in running if tokens[row] not in stop_ids]
        if not running or step == max_new_tokens - 1:
            break
        out = model(input_ids=torch.tensor([[t] for t in tokens], device=device), use_cache=True,
                    **{name: out[name]})
    return generated


def greedy(model, ids: list[int], max_new_tokens: int, stop_ids: frozenset[int] | set[int], min_new_tokens: int = 0,
           prefill_chunk: int | None = None) -> list[int]:
    """:func:`greedy_batch` of one prompt."""
    return greedy_batch(model, [ids], max_new_tokens, stop_ids, min_new_tokens, prefill_chunk)[0]


# ---- the memory-lean loss ------------------------------------------------------------------------------------


def _final_logit_softcap(model) -> float | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "final_logit_softcapping", None)


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
    cap = _final_logit_softcap(model)
    out = torch.empty(len(targets), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        end = min(start + chunk, len(targets))
        logits = head(hidden[start:end].to(device))
        if cap:  # in the model's dtype, as its own forward does
            logits = torch.tanh(logits / cap) * cap
        logits = logits.float()
        out[start:end] = F.cross_entropy(logits, targets[start:end].to(device), reduction="none").cpu()
    return out


def token_nll(model, ids: torch.Tensor | list[int], chunk: int = CHUNK, skip: int = 0) -> torch.Tensor:
    """NLL of tokens ``skip``+1..n−1 of ``ids`` (float32), as ``cross_entropy(model(ids).logits[:-1], ids[1:])``
    without its first ``skip`` rows (the LM head runs on the rows kept only)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError("a loss needs at least 2 tokens")
    return nll_from_hidden(model, hidden_states(model, ids)[skip:-1], ids[skip + 1:], chunk)


def check_head(model, ids: torch.Tensor | list[int], tokens: int = 64) -> None:
    """Raise EngineError when :func:`token_nll` does not reproduce ``model(ids).logits`` on a short prefix.

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
    if not torch.isfinite(plain).all():
        raise EngineError(f"{type(model).__name__}'s own logits are not finite on the first {len(ids)} tokens: "
                          "the model diverges under this variant")
    if not torch.allclose(lean, plain, rtol=0.02, atol=0.05):
        worst = float((lean - plain).abs().max())
        raise EngineError(f"the chunked LM head differs from {type(model).__name__}'s own logits by up to "
                          f"{worst:.3g} nats per token; this architecture post-processes its logits in a way "
                          "lctx does not reproduce, so its losses would be wrong")


# ---- prompt pieces -------------------------------------------------------------------------------------------


def render_chat(tokenizer, message: str) -> str:
    """The chat template's text around one user message, with the generation prompt (what
    ``apply_chat_template`` tokenizes, without adding special tokens again)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("chat_template: this tokenizer has no chat template (a base model?); run without "
                                "--chat-template")
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)


def chat_wrapper(tokenizer) -> tuple[list[int], list[int]]:
    """Ids of the chat template before and after a single user message (with the generation prompt)."""
    before, found, after = render_chat(tokenizer, _MESSAGE).partition(_MESSAGE)
    if not found:
        raise ChatTemplateError("chat_template: the tokenizer's chat template does not show the user message "
                                "verbatim")
    return encode(tokenizer, before, special=False), encode(tokenizer, after, special=False)


# ---- engine and sessions -------------------------------------------------------------------------------------


class Engine:
    """A loaded model (or, before loading, its tokenizer alone) and the means to run it under a RoPE spec."""

    def __init__(self, model, tokenizer, train_len: int, *, prefill_chunk: int | None = None, batch_size: int = 1,
                 name: str = "") -> None:
        self.name = name  # the model reference, as given
        self.model = model
        self.tokenizer = tokenizer
        self.train_len = train_len
        self.prefill_chunk = prefill_chunk
        self.batch_size = batch_size  # generation requests answered side by side, when their shapes agree
        self._pieces: dict[str, list[int]] = {}
        self._head_checked = model is None

    @classmethod
    def from_loaded(cls, loaded, train_len: int | None = None, *, prefill_chunk: int | None = None,
                    batch_size: int = 1) -> Engine:
        """An engine over an :class:`lctx.models.Loaded` model."""
        return cls(loaded.model, loaded.tokenizer, train_len or loaded.train_len, prefill_chunk=prefill_chunk,
                   batch_size=batch_size, name=loaded.name)

    # -- tokenizer-level pieces --

    def piece(self, text: str) -> list[int]:
        """Ids of a prompt piece without special tokens, cached (pieces repeat thousands of times)."""
        found = self._pieces.get(text)
        if found is None:
            found = self._pieces[text] = encode(self.tokenizer, text, special=False)
        return found

    def pieces(self, texts: list[str]) -> list[list[int]]:
        """Ids of many pieces, the missing ones tokenized in one call."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._pieces]
        if missing:
            encoded = self.tokenizer(missing, add_special_tokens=False, verbose=False)["input_ids"]
            self._pieces.update(zip(missing, map(list, encoded), strict=True))
        return [self._pieces[t] for t in texts]

    def fresh(self, texts: list[str]) -> list[list[int]]:
        """Ids of pieces that will not come again, tokenized together and not cached."""
        return list(map(list, self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]))

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        return encode(self.tokenizer, text, special=special)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def prefix(self) -> list[int]:
        """What the tokenizer puts before a text by itself (BOS), [] when nothing."""
        return special_prefix(self.tokenizer)

    def chat_wrapper(self) -> tuple[list[int], list[int]]:
        return chat_wrapper(self.tokenizer)

    def chat(self, message: str) -> list[int]:
        """Ids of ``message`` as the one user turn of the chat template, tokenized as one text (as
        ``apply_chat_template(tokenize=True)`` does): the wrapper is not cut apart from the message."""
        return encode(self.tokenizer, render_chat(self.tokenizer, message), special=False)

    @property
    def eos_ids(self) -> frozenset[int]:
        """End-of-sequence ids of the tokenizer and of the model's generation config."""
        ids = {self.tokenizer.eos_token_id}
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(eos if isinstance(eos, list | tuple) else [eos])
        return frozenset(i for i in ids if i is not None)

    @property
    def eos_or_pad(self) -> frozenset[int]:
        """The tokenizer's end-of-sequence and padding ids (what lctx's own retrieval tasks stop at)."""
        tok = self.tokenizer
        return frozenset(i for i in (tok.eos_token_id, getattr(tok, "pad_token_id", None)) if i is not None)

    # -- running the model --

    @contextlib.contextmanager
    def session(self, spec: RopeSpec, seq_len: int | None = None) -> Iterator[Session]:
        """The model patched with ``spec`` for the block (restored bit-exactly on exit, even by an exception).

        ``seq_len`` freezes the length a length-dependent variant scales for; without it each forward uses its
        own, and :meth:`Session.generate` freezes it per request.
        """
        if self.model is None:
            raise EngineError("this engine has a tokenizer only (no model loaded)")
        session = Session(self, spec, seq_len)
        try:
            yield session
        finally:
            session.close()


class Session:
    """A model patched with one spec; see :meth:`Engine.session`."""

    def __init__(self, engine: Engine, spec: RopeSpec, seq_len: int | None) -> None:
        self.engine, self.spec = engine, spec
        self._stack = contextlib.ExitStack()
        self._seq_len: int | None = None
        self._apply(seq_len)

    def _apply(self, seq_len: int | None) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(patches.apply(self.engine.model, self.spec, self.engine.train_len, seq_len=seq_len))
        self._seq_len = seq_len

    def close(self) -> None:
        self._stack.close()

    def nll(self, ids: torch.Tensor | list[int], skip: int = 0) -> torch.Tensor:
        """Per-token NLL (float32) of tokens ``skip``+1..n−1 given their prefixes; the first call per engine
        checks that the chunked LM head reproduces the model's own logits."""
        model = self.engine.model
        if not self.engine._head_checked:
            check_head(model, ids)
            self.engine._head_checked = True
        return token_nll(model, ids, skip=skip)

    def generate(self, request: GenerateRequest) -> Generation:
        """A greedy answer; a length-dependent variant is frozen at the request's prompt + answer."""
        return self.generate_batch([request])[0]

    def generate_batch(self, requests: list[GenerateRequest]) -> list[Generation]:
        """Greedy answers to requests of one shape (prompt length, budget, stops) computed side by side; with
        mixed shapes, one at a time."""
        shapes = {(len(r.ids), r.max_new_tokens, r.stop, r.min_new_tokens) for r in requests}
        if len(shapes) > 1:
            return [g for r in requests for g in self.generate_batch([r])]
        first = requests[0]
        if self.spec.length_dependent and self._seq_len != first.seq_len:
            self._apply(first.seq_len)
        rows = greedy_batch(self.engine.model, [r.ids for r in requests], first.max_new_tokens, first.stop,
                            first.min_new_tokens, self.engine.prefill_chunk)
        return [Generation(tokens, self.engine.decode(tokens)) for tokens in rows]
