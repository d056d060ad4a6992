"""Train-short/test-long lab: a byte-level Llama trained on CPU in minutes at a short context.

Su's extrapolation experiments train a small RoPE model at length L and evaluate it at 4–8 L. Here the corpus
is the Python reference manual shipped with CPython (``pydoc_data.topics``, so training needs no download),
the tokenizer maps each byte to its own id (no vocabulary to learn, nothing to fetch), and every source of
randomness comes from one seed, so a checkpoint can be rebuilt from the command recorded in its README.

``--rope SPEC`` trains under a RoPE variant (Su's inverse use of Leaky ReRoPE: ``leaky-rerope:k=…`` with k < 1,
then plain RoPE at inference). The spec is written to the checkpoint's config (``lctx_train_rope``, read by
:func:`lctx.models.training_rope`) and README, since ``--rope none`` then evaluates the model unlike it trained.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lctx import data, patches
from lctx import spec as grammar
from lctx.models import TRAIN_ROPE_KEY
from lctx.patches import RopeSpec
from lctx.spec import Param, SpecError

BOS, EOS = "<s>", "</s>"
VOCAB_SIZE = 258  # 256 bytes + bos + eos
VAL_FRACTION = data.HELDOUT_FRACTION
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

console = Console(stderr=True)


def corpus() -> tuple[str, str]:
    """(train, validation) text: pydoc topics concatenated in sorted key order, the tail held out (the corpus
    ``data=pydoc-heldout`` evaluates on)."""
    return data.pydoc_split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer whose token id is the byte value (bos = 256, eos = 257), built offline.

    It adds no special tokens: the model trains on windows cut anywhere in the byte stream, so evaluation
    windows need no BOS either.
    """
    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    vocab |= {BOS: 256, EOS: 257}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS, EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   model_max_length=int(1e30))


@dataclass(frozen=True)
class ToyConfig:
    """Architecture and optimisation settings; the defaults train the committed checkpoint's recipe."""

    layers: int = 4
    dim: int = 256
    heads: int = 4
    theta: float = 10000.0
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50

    def check(self) -> None:
        """ValueError naming the first setting that cannot train (before any work)."""
        problems = [
            (self.layers >= 1, f"--layers {self.layers} must be at least 1"),
            (self.dim >= 2, f"--dim {self.dim} must be at least 2"),
            (self.heads >= 1 and self.dim % self.heads == 0, f"--heads {self.heads} must divide --dim {self.dim}"),
            (self.heads >= 1 and self.dim % self.heads == 0 and (self.dim // self.heads) % 2 == 0,
             f"--dim {self.dim} / --heads {self.heads} must be an even head size (RoPE rotates pairs)"),
            (self.theta > 1 and math.isfinite(self.theta), f"--theta {self.theta:g} must be a RoPE base > 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size} must be at least 1"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr {self.lr:g} must be positive"),
            (self.warmup >= 1, f"--warmup {self.warmup} must be at least 1"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(message)

    def model_config(self, context: int) -> LlamaConfig:
        intermediate = -(-8 * self.dim // 3 // 16) * 16  # Llama's 8/3 · dim, rounded up to a multiple of 16
        return LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=self.dim, intermediate_size=intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.heads,
            max_position_embeddings=context, rope_parameters={"rope_type": "default", "rope_theta": self.theta},
            tie_word_embeddings=True, bos_token_id=256, eos_token_id=257, pad_token_id=257,
        )


def command(context: int, out: Path | str, steps: int, seed: int, config: ToyConfig, save_dtype: str,
            rope: RopeSpec | None = None) -> str:
    """The ``lctx toy train`` command line that reproduces a run (written to the checkpoint's README).

    ``rope`` is the resolved training variant, written in full so the command does not depend on defaults.
    """
    defaults = ToyConfig()
    args = ["lctx", "toy", "train", "--context", str(context), "--out", str(out), "--steps", str(steps),
            "--seed", str(seed)]
    for name in ("layers", "dim", "heads", "theta", "batch_size", "lr", "warmup"):
        value = getattr(config, name)
        if value != getattr(defaults, name):
            args += [f"--{name.replace('_', '-')}", str(value)]
    if save_dtype != "float32":
        args += ["--save-dtype", save_dtype]
    if rope is not None:
        args += ["--rope", rope.canonical]
    return shlex.join(args)


def training_spec(rope: str | None, context: int) -> RopeSpec | None:
    """The variant ``--rope`` trains under, resolved for ``context``; None for plain RoPE (no patch at all).

    Refused (ValueError, one line): specs that do not parse, length-dependent variants (they follow the length
    of each forward, and every training window has --context tokens, where they are no change or an arbitrary
    fixed one; train with the fixed variant instead), and variants missing a parameter that evaluation derives
    from a target length (training has none).
    """
    if rope is None:
        return None
    spec = patches.parse(rope)
    if spec.name == "none":
        return None
    variant = spec.variant
    if variant.length_dependent:
        raise ValueError(f"--rope {rope!r}: {spec.name} depends on the length of each forward, and every "
                         f"training window has --context {context} tokens, so training cannot follow it; train "
                         "with a fixed variant (e.g. yarn:factor=4, leaky-rerope:k=0.0625)")
    missing = [p.name for p in variant.params if p.required and p.name not in spec.kwargs]
    if missing:
        raise ValueError(f"--rope {rope!r}: give {', '.join(f'{name}=…' for name in missing)} (training has no "
                         "target length to derive it from)")
    return spec.resolve(context)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup to the peak, then cosine decay to 10% of it."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _windows(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``length + 1`` tokens (inputs plus next-token targets)."""
    count = (ids.numel() - 1) // length
    return torch.stack([ids[i * length: i * length + length + 1] for i in range(count)])


def _check(context: int, out: Path, steps: int, config: ToyConfig, save_dtype: str,
           rope: str | None) -> RopeSpec | None:
    """Every argument that cannot train, as a ValueError, before any work; returns the training variant."""
    config.check()
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"--save-dtype {save_dtype!r}: choose one of {', '.join(SAVE_DTYPES)}")
    if context < 2 or steps < 1:
        raise ValueError(f"--context {context} must be at least 2 and --steps {steps} at least 1")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a directory to save the model in")
    return training_spec(rope, context)


@torch.no_grad()
def _val_loss(model: LlamaForCausalLM, ids: torch.Tensor, context: int) -> float:
    windows = _windows(ids, context)
    losses = [torch.nn.functional.cross_entropy(model(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten(),
                                                reduction="sum") for batch in windows.split(32)]
    return (sum(losses) / (windows.shape[0] * context)).item()


def train(context: int, out: Path | str, steps: int = 600, seed: int = 0, config: ToyConfig | None = None, *,
          save_dtype: str = "float32", rope: str | None = None, threads: int | None = None,
          progress: bool = True) -> Path:
    """Train a byte-level Llama at ``context`` tokens on the pydoc corpus and save it as an HF directory.

    Deterministic for a seed and thread count: initial weights from ``torch.manual_seed(seed)`` and batch
    positions from a generator seeded with ``seed``. ``max_position_embeddings = context`` records the
    training length that lctx reads. ``rope``: a variant patched in for training and the held-out PPL (see
    :func:`training_spec`). Returns the output directory.
    """
    config = config or ToyConfig()
    out = Path(out)
    spec = _check(context, out, steps, config, save_dtype, rope)
    try:  # fail now, not after minutes of training
        out.mkdir(parents=True, exist_ok=True)
        (out / ".lctx-probe").write_bytes(b"")
        (out / ".lctx-probe").unlink()
    except OSError as err:
        raise ValueError(f"--out {str(out)!r} cannot be written: {err.strerror or err}") from None
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    tokenizer = byte_tokenizer()
    train_text, val_text = corpus()
    train_ids = torch.tensor(tokenizer(train_text, add_special_tokens=False).input_ids)
    val_ids = torch.tensor(tokenizer(val_text, add_special_tokens=False).input_ids)
    if context + 2 > min(train_ids.numel(), val_ids.numel()):
        raise ValueError(f"--context {context} is longer than the held-out corpus ({val_ids.numel()} tokens); use a "
                         "shorter context")

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config.model_config(context))
    model.config._attn_implementation = "sdpa"
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, config.warmup))
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(context + 1)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"toy model: {n_params / 1e6:.2f}M parameters, {config.layers} layers, dim {config.dim}, "
                  f"context {context}, {train_ids.numel():,} training bytes, {threads} threads"
                  + (f", trained under {spec}" if spec else ""))

    start = time.perf_counter()
    model.train()
    columns = (TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    under = patches.apply(model, spec, context) if spec else contextlib.nullcontext()
    with under, Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"))
        for _ in range(steps):
            starts = torch.randint(0, train_ids.numel() - context - 1, (config.batch_size,), generator=generator)
            batch = train_ids[starts[:, None] + offsets]
            logits = model(batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            bar.update(task, advance=1, loss=loss.item())
    elapsed = time.perf_counter() - start

    model.eval()
    if not math.isfinite(loss.item()):
        raise ValueError(f"training diverged (loss {loss.item()}); lower --lr or check --theta. Nothing was saved")
    with patches.apply(model, spec, context) if spec else contextlib.nullcontext():
        val_ppl = math.exp(_val_loss(model, val_ids, context))
    plain_ppl = math.exp(_val_loss(model, val_ids, context)) if spec else None
    console.print(f"trained {steps} steps in {elapsed:.0f} s; final train loss {loss.item():.3f}, "
                  f"held-out PPL at {context} tokens: {val_ppl:.2f}"
                  + (f" (under {spec}; {plain_ppl:.2f} with plain RoPE)" if spec else ""))
    if spec:
        setattr(model.config, TRAIN_ROPE_KEY, spec.canonical)
    model.to(SAVE_DTYPES[save_dtype]).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(_card(context, out, steps, seed, config, save_dtype, spec, threads, n_params,
                                         elapsed, loss.item(), val_ppl, plain_ppl))
    console.print(f"saved to {out}")
    return out


def _card(context: int, out: Path, steps: int, seed: int, config: ToyConfig, save_dtype: str,
          spec: RopeSpec | None, threads: int, n_params: int, elapsed: float, loss: float, val_ppl: float,
          plain_ppl: float | None) -> str:
    """The checkpoint's README: what it is, the command that rebuilds it, and what training measured."""
    trained_under = "" if spec is None else (
        f"Trained under the RoPE variant `{spec}` (the model's config records it as `{TRAIN_ROPE_KEY}`): "
        f"`lctx eval --rope none` runs it with plain RoPE, `--rope {spec}` as it was trained.\n\n")
    held_out = (f"- held-out PPL at {context} tokens: {val_ppl:.2f}\n" if spec is None else
                f"- held-out PPL at {context} tokens: {val_ppl:.2f} under `{spec}`, {plain_ppl:.2f} with plain RoPE\n")
    return (
        f"# Toy byte-level RoPE model (context {context})\n\n"
        f"A {n_params / 1e6:.2f}M-parameter Llama ({config.layers} layers, dim {config.dim}, {config.heads} heads, "
        f"rope_theta {config.theta:g}) trained by lctx on `pydoc_data.topics` (the Python reference manual, "
        f"topics in sorted key order, last {VAL_FRACTION:.0%} held out) at {context} tokens, one token per "
        f"byte, no BOS. Weights saved as {save_dtype}.\n\n"
        f"{trained_under}"
        f"Reproduce ({threads} threads; the result is bit-identical for the same seed and thread count):\n\n"
        f"```\n{command(context, out, steps, seed, config, save_dtype, spec)}\n```\n\n"
        f"- training time: {elapsed:.0f} s on {threads} CPU threads\n"
        f"- final training loss: {loss:.3f}\n"
        f"{held_out}"
    )


# An experiment's [train."DIR"] table: the `lctx toy train` options (but --out, which is DIR), as TOML values.
# Their bounds are ToyConfig.check's and _check's, as on the command line.
RECIPE_PARAMS = (
    Param("context", int, None, "training length in tokens (bytes)", required=True),
    Param("steps", int, 600, "optimizer steps"),
    Param("seed", int, 0, "seeds the initial weights and the data order"),
    Param("layers", int, ToyConfig.layers, "decoder layers"),
    Param("dim", int, ToyConfig.dim, "hidden size"),
    Param("heads", int, ToyConfig.heads, "attention heads (head dim = dim / heads)"),
    Param("theta", float, ToyConfig.theta, "rope_theta"),
    Param("batch_size", int, ToyConfig.batch_size, "windows per step"),
    Param("lr", float, ToyConfig.lr, "peak AdamW learning rate"),
    Param("warmup", int, ToyConfig.warmup, "linear warmup steps"),
    Param("save_dtype", str, "float32", "dtype of the saved weights: " + ", ".join(SAVE_DTYPES)),
    Param("rope", str, None, "RoPE variant to train under (default plain RoPE)"),
    Param("threads", int, 0, "CPU threads, 0 = all available (the weights are bit-identical per thread count)",
          ge=0),
)


@dataclass(frozen=True)
class Recipe:
    """One ``lctx toy train`` run but its output directory: what an experiment's ``[train."DIR"]`` table says."""

    context: int
    steps: int = 600
    seed: int = 0
    config: ToyConfig = ToyConfig()
    save_dtype: str = "float32"
    rope: str | None = None
    threads: int = 0

    @classmethod
    def from_table(cls, table: dict[str, Any], out: Path | str, owner: str) -> Recipe:
        """The recipe of a TOML table, checked as the command line is (unknown keys, bounds, a spec that cannot
        train): SpecError/ValueError naming ``owner`` and the key, before anything trains."""
        values = grammar.convert_all(owner, RECIPE_PARAMS, table.items(), "key = value lines of lctx toy train "
                                     "options (context = 128, rope = \"leaky-rerope:k=0.0625\")")
        missing = [p.name for p in RECIPE_PARAMS if p.required and p.name not in values]
        if missing:
            raise SpecError(f"{owner}: missing {', '.join(missing)} (e.g. context = 128). Keys: "
                            f"{grammar.describe_params(RECIPE_PARAMS)}")
        values = {p.name: values.get(p.name, p.default) for p in RECIPE_PARAMS}
        config = ToyConfig(**{name: values.pop(name) for name in
                              ("layers", "dim", "heads", "theta", "batch_size", "lr", "warmup")})
        recipe = cls(config=config, **values)
        try:
            _check(recipe.context, Path(out), recipe.steps, config, recipe.save_dtype, recipe.rope)
        except ValueError as err:
            raise SpecError(f"{owner}: {err}") from None
        return recipe

    def command(self, out: Path | str) -> str:
        """The command line that trains it into ``out`` (as the checkpoint's README records it)."""
        return command(self.context, out, self.steps, self.seed, self.config, self.save_dtype,
                       training_spec(self.rope, self.context))

    def trained(self, out: Path | str) -> bool | None:
        """Whether ``out`` holds the model this recipe trains (its README's command is the recipe's); None when
        it holds no model."""
        out = Path(out)
        if not (out / "config.json").is_file():
            return None
        card = out / "README.md"
        return card.is_file() and self.command(out) in card.read_text(encoding="utf-8").splitlines()

    def train(self, out: Path | str, progress: bool = True) -> Path:
        return train(self.context, out, self.steps, self.seed, self.config, save_dtype=self.save_dtype,
                     rope=self.rope, threads=self.threads or None, progress=progress)


toy_app = typer.Typer(help="Train-short/test-long lab: small RoPE models trained on CPU in minutes.",
                      no_args_is_help=True)


@toy_app.callback()
def _toy() -> None:
    """Train-short/test-long lab: small RoPE models trained on CPU in minutes."""


@toy_app.command("train")
def train_command(
    context: int = typer.Option(..., "--context", help="training length in tokens (bytes)"),
    out: Path = typer.Option(..., "--out", help="output directory (an HF model directory lctx can load)"),
    steps: int = typer.Option(600, "--steps", help="optimizer steps"),
    seed: int = typer.Option(0, "--seed", help="seeds the initial weights and the data order"),
    layers: int = typer.Option(ToyConfig.layers, "--layers"),
    dim: int = typer.Option(ToyConfig.dim, "--dim", help="hidden size"),
    heads: int = typer.Option(ToyConfig.heads, "--heads", help="attention heads (head dim = dim / heads)"),
    theta: float = typer.Option(ToyConfig.theta, "--theta", help="rope_theta"),
    batch_size: int = typer.Option(ToyConfig.batch_size, "--batch-size", help="windows per step"),
    lr: float = typer.Option(ToyConfig.lr, "--lr", help="peak AdamW learning rate (cosine decay to 10%)"),
    warmup: int = typer.Option(ToyConfig.warmup, "--warmup", help="linear warmup steps"),
    save_dtype: str = typer.Option("float32", "--save-dtype", help="float32, float16 or bfloat16"),
    rope: str | None = typer.Option(None, "--rope", help="train under this RoPE variant (lctx ropes), e.g. Su's "
                                    "inverse Leaky ReRoPE leaky-rerope:window=32:k=0.0625; default plain RoPE"),
    threads: int = typer.Option(0, "--threads", help="CPU threads; 0 = all available"),
) -> None:
    """Train a byte-level Llama RoPE model at a short context on the offline pydoc corpus, then save it.

    Evaluate it past its training length with `lctx eval --model DIR`.

    Example: lctx toy train --context 128 --out toy-128 --steps 600 --seed 0
    """
    config = ToyConfig(layers=layers, dim=dim, heads=heads, theta=theta, batch_size=batch_size, lr=lr,
                       warmup=warmup)
    try:
        train(context, out, steps, seed, config, save_dtype=save_dtype, rope=rope, threads=threads or None)
    except ValueError as err:
        console.print(f"[red]Error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
